"""Runs the current trigger SQL again: knoxgate's triggers now escape ``|`` and ``%`` in the
user ids their notifications carry, so that a user id holding ``|`` (a text primary key such as
an email address) is not read as two fields, which made every revocation of that user miss
the caches until their entries expired.

knoxgate does not trust its change feed until the token trigger carries the new mark; an
install made by an earlier migration does not. ``install.sql`` is idempotent, so running it
again brings any earlier install up to date. Reversing it changes nothing: 0001's reverse
removes everything.
"""

from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [("knoxgate_django", "0005_watch_username_and_email")]

    operations = [
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=migrations.RunSQL.noop),
    ]
