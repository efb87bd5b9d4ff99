"""Runs the current trigger SQL again on databases that applied 0001 with an older copy.

knoxgate's triggers gained statement-level TRUNCATE triggers and ``ENABLE ALWAYS`` (so that
changes made under ``session_replication_role = replica`` are reported too); knoxgate refuses to
start in notify mode until they are installed. ``install.sql`` is idempotent (``CREATE OR
REPLACE``, ``DROP TRIGGER IF EXISTS``), so running it again brings any earlier install up to
date. Reversing it changes nothing: 0001's reverse removes everything.
"""

from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [("knoxgate_django", "0001_triggers")]

    operations = [
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=migrations.RunSQL.noop),
    ]
