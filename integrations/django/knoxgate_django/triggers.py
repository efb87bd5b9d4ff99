"""The trigger SQL the migrations run: the packaged ``sql/`` files (``knoxgate migrate
--print-sql`` output), or those in ``KNOXGATE["TRIGGER_SQL_DIR"]`` for other table names."""

from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import migrations

#: The files shipped with the package.
PACKAGED_SQL_DIR = Path(__file__).resolve().parent / "sql"


def trigger_sql(name: str) -> str:
    """The text of ``install.sql`` or ``uninstall.sql``, read when the migration is loaded."""
    configured = (getattr(settings, "KNOXGATE", None) or {}).get("TRIGGER_SQL_DIR")
    directory = Path(configured) if configured else PACKAGED_SQL_DIR
    try:
        return (directory / name).read_text(encoding="utf-8")
    except OSError as e:
        # Read when Django loads the migration graph (migrate, showmigrations, makemigrations),
        # before any system check runs: say which setting is wrong.
        raise ImproperlyConfigured(
            f"knoxgate_django: cannot read the trigger SQL {name} from "
            f"{'TRIGGER_SQL_DIR ' if configured else ''}{directory}: {e}"
        ) from None


class RunTriggerSQL(migrations.RunSQL):
    """``RunSQL`` that runs only on PostgreSQL, the one database knoxgate reads.

    The trigger SQL is PL/pgSQL: on another database (SQLite test settings, say) it would fail
    the whole ``migrate``. There it does nothing, as there is no knoxgate to tell.
    """

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
