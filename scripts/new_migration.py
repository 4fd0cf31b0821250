"""Generate an Alembic migration from the models: `python scripts/new_migration.py "message" REV`.

Autogenerates against a scratch SQLite database upgraded to the current head.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    message, rev_id = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        config = Config()
        config.set_main_option("script_location", str(ROOT / "src/batchwise/store/migrations"))
        config.set_main_option("sqlalchemy.url", f"sqlite:///{tmp}/scratch.db")
        command.upgrade(config, "head")
        command.revision(config, message=message, autogenerate=True, rev_id=rev_id)


if __name__ == "__main__":
    main()
