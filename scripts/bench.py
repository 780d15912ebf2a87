"""``python scripts/bench.py ...`` runs ``arsq-bench ...`` (the tool is arsq_lightning/tools/bench.py)."""

from arsq_lightning.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
