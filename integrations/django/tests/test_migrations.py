"""The trigger migration: `manage.py migrate` installs exactly what `knoxgate migrate` installs,
and its reverse removes it.

Tests marked by needing KNOXGATE_BIN compare with the knoxgate binary: skipped when the variable
is unset, failing (never skipping) when it is set and the binary is missing or disagrees.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection

import knoxgate_django

SQL_DIR = Path(knoxgate_django.__file__).resolve().parent / "sql"
MIGRATIONS = sorted(p.stem for p in (SQL_DIR.parent / "migrations").glob("0*.py"))
#: The newest migration and the SHA-256 of the install.sql it was written for. A database
#: migrated with an earlier copy is brought up to date only by a migration that runs the SQL
#: again: when install.sql changes, add one (as 0006) and record it here.
NEWEST_MIGRATION = ("0006_escape_user_ids", "8cd32f176f6c12b4f9804ac832615b919b8cf584fac8535f8949109e584e66b7")
PG = {
    "host": os.environ.get("KGDJ_PG_HOST", "127.0.0.1"),
    "port": int(os.environ.get("KGDJ_PG_PORT", "5432")),
    "user": os.environ.get("KGDJ_PG_USER", "postgres"),
}
TRIGGERS = {
    ("knoxgate_token_changed", "knox_authtoken"),
    ("knoxgate_user_changed", "auth_user"),
    ("knoxgate_user_deleted", "auth_user"),
    ("knoxgate_membership_changed", "auth_user_groups"),
    ("knoxgate_group_renamed", "auth_group"),
    ("knoxgate_group_deleted", "auth_group"),
    # statement-level: TRUNCATE fires no row trigger
    ("knoxgate_token_truncated", "knox_authtoken"),
    ("knoxgate_user_truncated", "auth_user"),
    ("knoxgate_membership_truncated", "auth_user_groups"),
}


def knoxgate_bin() -> Path:
    value = os.environ.get("KNOXGATE_BIN")
    if not value:
        pytest.skip("KNOXGATE_BIN is not set (run-tests.sh sets it)")
    path = Path(value)
    assert path.is_file() and os.access(path, os.X_OK), f"KNOXGATE_BIN={value} is not an executable file"
    return path


def run_knoxgate(*args: str, db_url: str) -> subprocess.CompletedProcess:
    # knoxgate refuses KNOXGATE_* variables it does not know, KNOXGATE_BIN included.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOXGATE_")}
    env["KNOXGATE_POSTGRES_URL"] = db_url
    return subprocess.run(
        [str(knoxgate_bin()), *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def installed_triggers(cursor) -> set[tuple[str, str]]:
    cursor.execute(
        "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'knoxgate%%'"
    )
    return set(cursor.fetchall())


def catalog_snapshot(cursor) -> dict[str, list]:
    """Everything the trigger SQL creates, as Postgres itself describes it."""
    queries = {
        "functions": "SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE proname LIKE 'knoxgate%%' ORDER BY 1",
        "triggers": "SELECT tgname, tgrelid::regclass::text, pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE NOT tgisinternal AND tgname LIKE 'knoxgate%%' ORDER BY 1",
        "log_columns": "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_name = 'knoxgate_revocation_log' ORDER BY ordinal_position",
        "log_indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'knoxgate_revocation_log' ORDER BY 1",
    }
    snapshot = {}
    for name, sql in queries.items():
        cursor.execute(sql)
        snapshot[name] = [tuple(row) for row in cursor.fetchall()]
    return snapshot


# --- what `manage.py migrate` left in the test database ---


@pytest.mark.django_db
def test_migrate_installs_the_triggers_and_they_fire(django_user_model):
    from knox.models import AuthToken

    with connection.cursor() as c:
        assert installed_triggers(c) == TRIGGERS
        user = django_user_model.objects.create_user("carol", "c@example.com", "pw")
        instance, _ = AuthToken.objects.create(user=user)
        instance.delete()
        user.set_password("new")
        user.save()
        c.execute("SELECT kind, user_id, token_key FROM knoxgate_revocation_log ORDER BY id")
        assert c.fetchall() == [
            ("i", str(user.pk), instance.token_key),
            ("t", str(user.pk), instance.token_key),
            ("u", str(user.pk), None),
        ]


@pytest.mark.django_db(transaction=True)
def test_reverse_migration_removes_everything_and_reapplies():
    call_command("migrate", "knoxgate_django", "zero", verbosity=0)
    try:
        with connection.cursor() as c:
            assert installed_triggers(c) == set()
            c.execute("SELECT to_regclass('knoxgate_revocation_log')")
            assert c.fetchone() == (None,)
            c.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE 'knoxgate%%'")
            assert c.fetchone() == (0,)
    finally:
        call_command("migrate", "knoxgate_django", verbosity=0)
    with connection.cursor() as c:
        assert installed_triggers(c) == TRIGGERS


def test_migration_runs_the_packaged_files_verbatim():
    from importlib import import_module

    migration = import_module("knoxgate_django.migrations.0001_triggers").Migration
    (op,) = migration.operations
    assert op.sql == [(SQL_DIR / "install.sql").read_text()]
    assert op.reverse_sql == [(SQL_DIR / "uninstall.sql").read_text()]
    for name in MIGRATIONS[1:]:
        reinstall = import_module(f"knoxgate_django.migrations.{name}").Migration
        (op,) = reinstall.operations
        assert op.sql == [(SQL_DIR / "install.sql").read_text()], name


def test_every_change_to_install_sql_has_a_migration_that_runs_it_again():
    digest = hashlib.sha256((SQL_DIR / "install.sql").read_bytes()).hexdigest()
    assert (MIGRATIONS[-1], digest) == NEWEST_MIGRATION, (
        "install.sql is not the file the newest migration was written for: databases migrated "
        "before would keep the old triggers; add a migration that runs it again and record it "
        "in NEWEST_MIGRATION"
    )


@pytest.mark.django_db(transaction=True)
def test_an_install_made_by_0003_from_an_earlier_sql_gets_the_mark_knoxgate_needs():
    mark = "-- knoxgate token trigger: INSERTs and moved keys logged, user ids escaped"
    install = (SQL_DIR / "install.sql").read_text()
    assert mark in install

    def marked(c) -> bool:
        c.execute(
            "SELECT strpos(p.prosrc, %s) > 0 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE t.tgrelid = 'knox_authtoken'::regclass AND t.tgname = 'knoxgate_token_changed'",
            [mark],
        )
        return c.fetchone()[0]

    # What 0003 installed from the SQL of its day: the same trigger without the mark.
    call_command("migrate", "knoxgate_django", "0003", verbosity=0)
    try:
        with connection.cursor() as c:
            c.execute(install.replace(mark, ""))
            assert not marked(c)
    finally:
        call_command("migrate", "knoxgate_django", verbosity=0)
    with connection.cursor() as c:
        assert marked(c)


@pytest.mark.django_db(transaction=True)
def test_an_install_from_before_0005_gets_the_username_and_email_watched():
    install = (SQL_DIR / "install.sql").read_text()
    before = install.replace(", username, email ON auth_user", " ON auth_user").replace(
        " OR OLD.username IS DISTINCT FROM NEW.username OR OLD.email IS DISTINCT FROM NEW.email", "")
    assert before != install

    def watched(c) -> set[str]:
        c.execute(
            "SELECT a.attname FROM pg_trigger t JOIN pg_attribute a ON a.attrelid = t.tgrelid "
            "AND a.attnum = ANY(t.tgattr::int2[]) "
            "WHERE t.tgrelid = 'auth_user'::regclass AND t.tgname = 'knoxgate_user_changed'"
        )
        return {row[0] for row in c.fetchall()}

    # What 0004 installed from the SQL of its day: the user trigger without the two columns.
    call_command("migrate", "knoxgate_django", "0004", verbosity=0)
    try:
        with connection.cursor() as c:
            c.execute(before)
            assert watched(c) == {"is_active", "password", "is_staff", "is_superuser"}
    finally:
        call_command("migrate", "knoxgate_django", verbosity=0)
    with connection.cursor() as c:
        assert {"username", "email"} <= watched(c)


def test_migrate_on_a_database_other_than_postgresql_does_nothing_and_succeeds(django_db_blocker):
    """SQLite test settings: the PL/pgSQL is not run there, and migrate does not fail."""
    from django.db.migrations.executor import MigrationExecutor
    from django.db.utils import ConnectionHandler

    sqlite = ConnectionHandler({"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}})["default"]
    with django_db_blocker.unblock():
        migrate_and_back(sqlite)


def migrate_and_back(sqlite) -> None:
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(sqlite)
        executor.migrate([("knoxgate_django", MIGRATIONS[-1])])
        executor.loader.build_graph()
        assert ("knoxgate_django", MIGRATIONS[-1]) in executor.loader.applied_migrations
        with sqlite.cursor() as c:
            c.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'knoxgate%'")
            assert c.fetchone() == (0,)
        executor.migrate([("knoxgate_django", None)])
    finally:
        sqlite.close()


@pytest.mark.django_db(transaction=True)
def test_an_install_made_by_an_older_0001_is_brought_up_to_date():
    # Back to 0001 (0002's reverse changes nothing), then take away what an older copy of the
    # SQL did not install: the TRUNCATE triggers.
    call_command("migrate", "knoxgate_django", "0001", verbosity=0)
    try:
        with connection.cursor() as c:
            assert installed_triggers(c) == TRIGGERS
            c.execute("DROP TRIGGER knoxgate_token_truncated ON knox_authtoken")
            c.execute("DROP TRIGGER knoxgate_user_truncated ON auth_user")
            c.execute("DROP TRIGGER knoxgate_membership_truncated ON auth_user_groups")
            assert installed_triggers(c) != TRIGGERS
    finally:
        call_command("migrate", "knoxgate_django", verbosity=0)
    with connection.cursor() as c:
        assert installed_triggers(c) == TRIGGERS


@pytest.mark.django_db(transaction=True)
def test_an_install_whose_token_trigger_logs_no_inserts_is_brought_up_to_date(django_user_model):
    from knox.models import AuthToken

    def logged_inserts(c):
        c.execute("SELECT count(*) FROM knoxgate_revocation_log WHERE kind = 'i'")
        return c.fetchone()[0]

    user = django_user_model.objects.create_user("dora", "d@example.com", "pw")
    # What 0001 and 0002 installed before INSERTs were logged: the same SQL without that line.
    log_insert = (
        "INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) "
        "VALUES ('i', NEW.user_id::text, NEW.token_key);"
    )
    mark = "-- knoxgate token trigger: INSERTs and moved keys logged, user ids escaped"
    install = (SQL_DIR / "install.sql").read_text()
    assert log_insert in install and mark in install
    call_command("migrate", "knoxgate_django", "0002", verbosity=0)
    try:
        with connection.cursor() as c:
            c.execute(install.replace(log_insert, "").replace(mark, ""))
            before = logged_inserts(c)
            AuthToken.objects.create(user=user)
            assert logged_inserts(c) == before
    finally:
        call_command("migrate", "knoxgate_django", verbosity=0)
    with connection.cursor() as c:
        AuthToken.objects.create(user=user)
        assert logged_inserts(c) == before + 1


# --- against the knoxgate binary ---


def test_packaged_sql_is_knoxgate_print_sql():
    """The files are `knoxgate migrate --print-sql` (and `--uninstall-triggers`) output."""
    # An address where nothing listens: printing the SQL must not need a database.
    url = "postgres://nobody@127.0.0.1:1/none"
    install = run_knoxgate("migrate", "--print-sql", db_url=url)
    assert install.returncode == 0, install.stderr
    uninstall = run_knoxgate("migrate", "--print-sql", "--uninstall-triggers", db_url=url)
    assert uninstall.returncode == 0, uninstall.stderr
    assert (SQL_DIR / "install.sql").read_text().rstrip("\n") == install.stdout.rstrip("\n")
    assert (SQL_DIR / "uninstall.sql").read_text().rstrip("\n") == uninstall.stdout.rstrip("\n")


@pytest.fixture
def scratch_db():
    """A database of its own, dropped afterwards."""
    name = f"kgdj_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.django_db
def test_django_migrate_installs_what_knoxgate_migrate_installs(scratch_db):
    name, url = scratch_db
    migrated = run_knoxgate("migrate", db_url=url)
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(dbname=name, **PG) as conn, conn.cursor() as cur:
        theirs = catalog_snapshot(cur)
    with connection.cursor() as c:
        ours = catalog_snapshot(c)
    assert len(ours["functions"]) == 5 and len(ours["triggers"]) == 9 and ours["log_columns"]
    assert ours == theirs

    # And knoxgate's own uninstall leaves what the reverse migration leaves: nothing.
    removed = run_knoxgate("migrate", "--uninstall-triggers", db_url=url)
    assert removed.returncode == 0, removed.stderr
    with psycopg.connect(dbname=name, **PG) as conn, conn.cursor() as cur:
        assert catalog_snapshot(cur) == {"functions": [], "triggers": [], "log_columns": [], "log_indexes": []}


def test_trigger_sql_dir_setting(settings, tmp_path):
    """KNOXGATE["TRIGGER_SQL_DIR"] replaces the shipped SQL (other table names)."""
    import importlib

    module = importlib.import_module("knoxgate_django.migrations.0001_triggers")
    (tmp_path / "install.sql").write_text("SELECT 'install for accounts_user';\n")
    (tmp_path / "uninstall.sql").write_text("SELECT 'uninstall for accounts_user';\n")
    settings.KNOXGATE = {**settings.KNOXGATE, "TRIGGER_SQL_DIR": str(tmp_path)}
    try:
        (op,) = importlib.reload(module).Migration.operations
        assert op.sql == ["SELECT 'install for accounts_user';\n"]
        assert op.reverse_sql == ["SELECT 'uninstall for accounts_user';\n"]
    finally:
        del settings.KNOXGATE["TRIGGER_SQL_DIR"]
        importlib.reload(module)
    (op,) = module.Migration.operations
    assert op.sql == [(SQL_DIR / "install.sql").read_text()]
