"""``python scripts/make_dataset.py ...`` runs ``arsq-dataset ...`` (arsq_lightning/tools/make_dataset.py)."""

from arsq_lightning.tools.make_dataset import main

if __name__ == "__main__":
    raise SystemExit(main())
