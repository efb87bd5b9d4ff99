"""Runs the current trigger SQL again: knoxgate's token trigger now logs INSERTs too.

A relay's replay of the revocation log then brings back the INSERTs its stream missed, so that
instances' key filters learn them without reloading; knoxgate refuses to start its change feed
until the trigger logs them. ``install.sql`` is idempotent, so running it again brings any
earlier install up to date. Reversing it changes nothing: 0001's reverse removes everything.
"""

from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [("knoxgate_django", "0002_reinstall_triggers")]

    operations = [
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=migrations.RunSQL.noop),
    ]
