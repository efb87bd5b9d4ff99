"""Installs knoxgate's change-feed triggers (its reverse removes them).

The SQL is exactly what ``knoxgate migrate`` runs: ``knoxgate_django/sql/install.sql`` and
``uninstall.sql`` are the output of ``knoxgate migrate --print-sql`` (regenerate them with
``integrations/django/update-sql.sh``). ``KNOXGATE["TRIGGER_SQL_DIR"]`` points at a directory
with the two files generated for other table names (a custom user model).
"""

from django.conf import settings
from django.db import migrations

from knoxgate_django.triggers import RunTriggerSQL, trigger_sql


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("knox", "0009_extend_authtoken_field"),
    ]

    operations = [
        # A one-element list: the script runs as one statement batch, as knoxgate runs it
        # (a bare string would be split by sqlparse, which need not understand $$ bodies).
        RunTriggerSQL(sql=[trigger_sql("install.sql")], reverse_sql=[trigger_sql("uninstall.sql")]),
    ]
