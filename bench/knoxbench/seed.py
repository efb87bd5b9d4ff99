"""A fresh bench database with seeded knox tokens.

`seed_tokens` writes users and knox tokens with SQL exactly as knox stores them and the raw tokens
to files; bench/soak.py and bench/login.py seed their own databases with it too. `setup_db` is
the main benchmark's database: dropped and re-created, Django's and knoxgate's migrations, the
100k tokens, and a check that one seeded digest matches hashlib's.
"""

import time

from .config import (DB, DJPROJECT, EXTRA_USERS, HOT_SET, KNOXGATE, LOGS, MAIN_USERS, OUT, PG_HOST,
                     PG_PORT, PG_USER, TOKENS, TOKENS_ALL, TOKENS_PER_USER, VENV, log)
from .procs import psql, run
from .results import NOTES
from .servers import dj_env, kg_env


def seed_tokens(main_users, extra_users, tokens_per_user, main_file, all_file=None):
    """Users `bench_1…` and `tokens_per_user` knox tokens each, written with SQL exactly as knox
    stores them (sha512 hex digest, token_key = first 15 characters, expiry now()+10h). The raw
    tokens of the first `main_users` users go to `main_file` (shuffled), all of them to `all_file`."""
    all_copy = (f"\\copy (SELECT tok FROM bench_tok ORDER BY random()) TO '{all_file}'\n"
                if all_file else "")
    sql = f"""
\\set ON_ERROR_STOP 1
BEGIN;
INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name,
                       email, is_staff, is_active, date_joined)
SELECT '!bench-unusable', NULL, false, 'bench_' || g, '', '', '', false, true, now()
FROM generate_series(1, {main_users + extra_users}) g;
CREATE TEMP TABLE bench_tok AS
SELECT u.id AS user_id,
       (substr(u.username, 7)::int <= {main_users}) AS main,
       md5(random()::text) || md5(random()::text) AS tok
FROM auth_user u CROSS JOIN generate_series(1, {tokens_per_user}) j
WHERE u.username LIKE 'bench\\_%';
INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key)
SELECT encode(sha512(convert_to(tok, 'UTF8')), 'hex'), now(), user_id,
       now() + interval '10 hours', left(tok, 15)
FROM bench_tok;
COMMIT;
\\copy (SELECT tok FROM bench_tok WHERE main ORDER BY random()) TO '{main_file}'
{all_copy}ANALYZE;
"""
    seed = OUT / "seed.sql"
    seed.write_text(sql)
    run(["psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", DB, "-X", "-q", "-f", str(seed)],
        timeout=600)


def setup_db():
    log(f"fresh database {DB}")
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", db="postgres")
    psql(f"CREATE DATABASE {DB}", db="postgres")
    log("django migrate (DJ_KNOX_REDIS=1, so knox_redis is installed too)")
    run([str(VENV / "bin" / "python"), "manage.py", "migrate", "--no-input", "--verbosity", "0"],
        env=dj_env(True), cwd=DJPROJECT, timeout=300)
    log("knoxgate migrate")
    p = run([str(KNOXGATE), "migrate"], env=kg_env(), timeout=120)
    (LOGS / "knoxgate-migrate.log").write_text(p.stdout + p.stderr)
    t = time.monotonic()
    n_main = MAIN_USERS * TOKENS_PER_USER
    seed_tokens(MAIN_USERS, EXTRA_USERS, TOKENS_PER_USER, TOKENS, TOKENS_ALL)
    n1 = sum(1 for _ in TOKENS.open())
    n2 = sum(1 for _ in TOKENS_ALL.open())
    rows = psql("SELECT count(*) FROM knox_authtoken")
    users = psql("SELECT count(*) FROM auth_user")
    log(f"seeded {rows} tokens over {users} users in {time.monotonic() - t:.1f}s "
        f"(tokens.txt {n1}, tokens100k.txt {n2})")
    assert n1 == n_main, (n1, n_main)
    NOTES.append(f"Seed: {rows} knox tokens over {users} users ({TOKENS_PER_USER} per user, expiry "
                 f"now()+10h), SQL INSERT…SELECT generate_series, digests computed in SQL, "
                 f"{time.monotonic() - t:.1f}s. Main set tokens.txt = {n1} tokens of {MAIN_USERS} "
                 f"users; hot set = its first {HOT_SET} (shuffled).")
    # sanity: one token verifies by digest in SQL exactly as knox computes it (python hashlib)
    import hashlib
    tok = TOKENS.open().readline().strip()
    digest = hashlib.sha512(tok.encode()).hexdigest()
    found = psql(f"SELECT count(*) FROM knox_authtoken WHERE digest = '{digest}' "
                 f"AND token_key = '{tok[:15]}'")
    assert found == "1", "seeded digest does not match hashlib.sha512"
