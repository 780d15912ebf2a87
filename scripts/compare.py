"""``python scripts/compare.py ...`` runs ``arsq-compare ...`` (the tool is arsq_lightning/tools/compare.py)."""

from arsq_lightning.tools.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
