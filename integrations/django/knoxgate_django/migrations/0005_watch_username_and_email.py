"""Runs the current trigger SQL again: knoxgate's user trigger now watches the username and
email columns too, so that a rename or a new address reaches the identity headers knoxgate
sends (``verify.username_header``, ``verify.email_header``) as soon as a revocation would.

knoxgate refuses to start its change feed, when its answers carry the username or email, until
the user trigger watches those columns; an install made by an earlier migration does not.
``install.sql`` is idempotent, so running it again brings any earlier install up to date.
Reversing it changes nothing: 0001's reverse removes everything.
"""

from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [("knoxgate_django", "0004_token_trigger_mark")]

    operations = [
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=migrations.RunSQL.noop),
    ]
