"""The revision the app checks at start-up is the head of migrations/versions."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from app.store.schema import SCHEMA_REVISION

ROOT = Path(__file__).resolve().parents[2]


def test_schema_revision_is_the_alembic_head() -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    assert ScriptDirectory.from_config(config).get_heads() == [SCHEMA_REVISION]
