"""``python scripts/benchmark.py ...`` runs ``arsq-benchmark ...`` (the tool is arsq_lightning/tools/benchmark.py)."""

from arsq_lightning.tools.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
