"""Runs the current trigger SQL again: knoxgate's token trigger now reports a row moved to
another key as that key inserted, and carries the mark knoxgate looks for.

knoxgate refuses to start its change feed until the token trigger's function carries
``-- knoxgate token trigger: INSERTs and moved keys logged``; an install made by 0003 from an
earlier copy of the SQL lacks it. ``install.sql`` is idempotent, so running it again brings any
earlier install up to date. Reversing it changes nothing: 0001's reverse removes everything.

Whenever ``install.sql`` changes, a new migration like this one runs it again (the package's
tests hold the newest migration to the file's digest).
"""

from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [("knoxgate_django", "0003_log_inserts")]

    operations = [
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=migrations.RunSQL.noop),
    ]
