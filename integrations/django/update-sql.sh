#!/usr/bin/env bash
# Regenerate knoxgate_django/sql/{install,uninstall}.sql from knoxgate itself, so that the
# Django migration runs exactly the SQL `knoxgate migrate` runs.
#
#   integrations/django/update-sql.sh
#
# Uses `cargo run -- migrate --print-sql [--uninstall-triggers]` in the repository with the
# default configuration (tables knox_authtoken / auth_user). For other table names, run the
# same commands with your knoxgate configuration, write the output to a directory of your own
# and point KNOXGATE["TRIGGER_SQL_DIR"] at it. tests/test_migrations.py checks the files.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/knoxgate_django/sql"

cd "$repo"
# knoxgate reads KNOXGATE_* variables as configuration: print the SQL for the defaults only.
clean_env=()
while IFS='=' read -r name _; do
    [[ $name == KNOXGATE_* ]] && clean_env+=(-u "$name")
done < <(env)
print_sql() {
    env "${clean_env[@]}" KNOXGATE_POSTGRES_URL="postgres://unused@127.0.0.1:1/unused" \
        cargo run --quiet --locked -- migrate --print-sql "$@"
}
trap 'rm -f "$out/install.sql.new" "$out/uninstall.sql.new"' EXIT
print_sql >"$out/install.sql.new"
print_sql --uninstall-triggers >"$out/uninstall.sql.new"
mv "$out/install.sql.new" "$out/install.sql"
mv "$out/uninstall.sql.new" "$out/uninstall.sql"
echo "update-sql.sh: wrote $out/install.sql and $out/uninstall.sql"
# A database migrated before keeps its triggers until a migration runs the new SQL again.
if ! git -C "$repo" diff --quiet -- "$out/install.sql"; then
    echo "update-sql.sh: install.sql changed: add a migration that runs it again (as" \
        "migrations/0006_escape_user_ids.py) and record it in tests/test_migrations.py" >&2
fi
