"""``python scripts/make_demos.py ...`` runs ``arsq-demos ...`` (the tool is arsq_lightning/tools/make_demos.py)."""

from arsq_lightning.tools.make_demos import cli

if __name__ == "__main__":
    raise SystemExit(cli())
