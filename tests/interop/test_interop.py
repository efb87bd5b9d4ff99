"""Django + django-rest-knox (+ django-rest-knox-redis) against knoxgate, sharing one database.

Every test starts its own stack (see conftest.py): a fresh Postgres database and Redis DB,
our Django project under gunicorn and knoxgate, configured with the same knox settings.
Each test is marked `knoxgate(<features>)` with the knoxgate features it exercises:

  verify       GET/POST /verify answers 200 + X-Auth-User-Id, or 401 with knox's body
  login        POST /api/auth/login/ (HTTP Basic or JSON) answers like knox's LoginView
  logout       POST /api/auth/logout/ and /api/auth/logoutall/ answer 204 and delete rows
  notify       revocations written by Django reach knoxgate within REVOCATION_BUDGET
  redis-cache  entries in django-rest-knox-redis's format are read and written
  expiry       expired tokens are refused and their rows deleted
  migrate      `knoxgate migrate` installs its triggers and coexists with Django's schema
  strict-mode / ttl-mode   KNOXGATE_CACHE_CONSISTENCY=strict / ttl
"""

import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import describe, eventually

pytestmark = pytest.mark.knoxgate
knoxgate = pytest.mark.knoxgate

PASSWORD = "correct horse battery staple"
#: how long a revocation done by Django may take to reach knoxgate in notify mode (~100 ms promised)
REVOCATION_BUDGET = 2.0
#: knox's default TOKEN_TTL
TEN_HOURS = timedelta(hours=10)
#: knox's login expiry: isoformat() in UTC with 'Z'; 6 fractional digits, none when microsecond is 0
EXPIRY_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")

INVALID_TOKEN = "Invalid token."
USER_INACTIVE = "User inactive or deleted."
INVALID_LOGIN = "Invalid username/password."


# === assertions ===


def json_body(response):
    try:
        return response.json()
    except ValueError:
        return None


def assert_verified(response, user_id):
    """knoxgate accepted the token and named its user."""
    assert response.status_code == 200, describe(response)
    assert response.headers.get("X-Auth-User-Id") == str(user_id), describe(response)


def assert_token_refused(response, detail):
    """A 401 exactly as knox's TokenAuthentication gives it."""
    assert response.status_code == 401, describe(response)
    assert response.headers.get("WWW-Authenticate") == "Token", describe(response)
    assert json_body(response) == {"detail": detail}, describe(response)


def assert_login_refused(response):
    """A 401 exactly as knox's LoginView with BasicAuthentication gives it."""
    assert response.status_code == 401, describe(response)
    assert response.headers.get("WWW-Authenticate") == 'Basic realm="api"', describe(response)
    assert json_body(response) == {"detail": INVALID_LOGIN}, describe(response)


def assert_no_content(response):
    assert response.status_code == 204, describe(response)
    assert response.content == b"", describe(response)


def assert_django_accepts(stack, token, user):
    response = stack.django_protected(token)
    assert response.status_code == 200, describe(response)
    assert json_body(response) == {"username": user["username"], "user_id": user["id"]}
    return response


def assert_django_refuses(stack, token, detail=INVALID_TOKEN):
    assert_token_refused(stack.django_protected(token), detail)


def refused_by_knoxgate_within(stack, token, detail, within=REVOCATION_BUDGET):
    """Poll knoxgate's /verify until it stops answering 200; that answer must be knox's 401."""
    response, elapsed = eventually(
        lambda: stack.verify(token),
        lambda r: r.status_code != 200,
        within=within,
        what=f"knoxgate refusing token {token[:15]}...",
        show=describe,
    )
    print(f"knoxgate refused {token[:15]}... after {elapsed * 1000:.0f} ms")
    assert_token_refused(response, detail)
    assert elapsed < within
    return elapsed


def rows_gone_within(stack, token_key, within=REVOCATION_BUDGET):
    eventually(
        lambda: stack.token_rows(token_key),
        lambda rows: rows == [],
        within=within,
        what=f"knox_authtoken row {token_key} deleted",
    )


def knox_expiry_string(value, time_zone=timezone.utc):
    """What knox's LoginView prints for an expiry with USE_TZ=True and this TIME_ZONE."""
    text = value.astimezone(time_zone).isoformat()
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text


def digest(stack, token):
    return hashlib.new(stack.settings.hash_algorithm, token.encode("utf-8")).hexdigest()


def assert_knox_login_response(stack, response, user, *, ttl=TEN_HOURS, time_zone=timezone.utc):
    """knoxgate's login answered like knox's LoginView and stored a knox row; returns the token."""
    assert response.status_code == 200, describe(response)
    assert response.headers.get("Content-Type", "").split(";")[0] == "application/json"
    body = json_body(response)
    assert isinstance(body, dict), describe(response)
    assert list(body) == ["expiry", "token"], describe(response)
    assert response.text == json.dumps(body, separators=(",", ":")), "DRF renders compact JSON"

    token = body["token"]
    prefix = stack.settings.token_prefix
    assert token.startswith(prefix), body
    assert re.fullmatch(r"[0-9a-f]{64}", token[len(prefix):]), body

    rows = stack.token_rows(token[:15])
    assert len(rows) == 1, f"expected one knox_authtoken row for token_key {token[:15]}: {rows}"
    row = rows[0]
    assert row["digest"] == digest(stack, token)
    assert row["user_id"] == user["id"]
    assert abs(row["created"] - datetime.now(timezone.utc)) < timedelta(seconds=60), row
    if ttl is None:
        assert body["expiry"] is None
        assert row["expiry"] is None
    else:
        if time_zone is timezone.utc:
            assert EXPIRY_FORMAT.fullmatch(body["expiry"]), body
        assert body["expiry"] == knox_expiry_string(row["expiry"], time_zone), (body, row)
        assert abs((row["expiry"] - row["created"]) - ttl) < timedelta(seconds=1), row
    return token


def wait_for_clock(moment):
    """Block until the wall clock has passed `moment` (an aware datetime)."""
    while (remaining := (moment - datetime.now(timezone.utc)).total_seconds()) > 0:
        time.sleep(min(remaining, 0.05))


# === tokens created by Django verify in knoxgate ===


@knoxgate("verify")
def test_token_created_by_django_verifies_in_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert len(token) == 64

    assert_verified(stack.verify(token), user["id"])
    assert_django_accepts(stack, token, user)


@knoxgate("verify")
def test_token_from_django_login_view_verifies_in_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)
    login = stack.django_login("alice", PASSWORD)
    assert login.status_code == 200, describe(login)

    assert_verified(stack.verify(login.json()["token"]), user["id"])


@knoxgate("verify")
def test_token_with_prefix_created_by_django_verifies_in_knoxgate(start_stack):
    stack = start_stack(token_prefix="myapp_")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert token.startswith("myapp_") and len(token) == 70

    assert_verified(stack.verify(token), user["id"])


@knoxgate("verify")
def test_token_hashed_with_sha256_by_django_verifies_in_knoxgate(start_stack):
    stack = start_stack(hash_algorithm="sha256")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]
    assert token["digest"] == hashlib.sha256(token["token"].encode()).hexdigest()

    assert_verified(stack.verify(token["token"]), user["id"])


@knoxgate("verify")
def test_token_without_expiry_created_by_django_verifies_in_knoxgate(start_stack):
    stack = start_stack(token_ttl="none")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    assert user["tokens"][0]["expiry"] is None

    assert_verified(stack.verify(user["tokens"][0]["token"]), user["id"])


@knoxgate("verify")
def test_knoxgate_verify_answers_the_same_for_any_method(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]

    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        assert_verified(stack.verify(token, method=method), user["id"])
        assert_token_refused(stack.verify("0" * 64, method=method), INVALID_TOKEN)


@knoxgate("verify")
def test_unknown_and_tampered_tokens_are_refused_by_knoxgate_with_knox_body(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    wrong_tail = token[:-1] + ("0" if token[-1] != "0" else "1")

    for candidate in ("0" * 64, wrong_tail, token.upper(), token[:15], "not-hex-at-all"):
        assert_token_refused(stack.verify(candidate), INVALID_TOKEN)
        assert_django_refuses(stack, candidate)
    assert_verified(stack.verify(token), user["id"])


@knoxgate("verify")
def test_token_of_a_user_created_inactive_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1, inactive=True)
    token = user["tokens"][0]["token"]

    assert_token_refused(stack.verify(token), USER_INACTIVE)
    assert_django_refuses(stack, token, USER_INACTIVE)


# === tokens from knoxgate's login authenticate in Django ===


@knoxgate("login")
def test_token_from_knoxgate_login_authenticates_in_django(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)

    assert_django_accepts(stack, token, user)
    assert_verified(stack.verify(token), user["id"])


@knoxgate("login")
def test_token_with_prefix_from_knoxgate_login_authenticates_in_django(start_stack):
    stack = start_stack(token_prefix="myapp_")
    user = stack.create_user("alice", PASSWORD)

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    assert token.startswith("myapp_") and len(token) == 70

    assert_django_accepts(stack, token, user)


@knoxgate("login")
def test_token_hashed_with_sha256_by_knoxgate_login_authenticates_in_django(start_stack):
    stack = start_stack(hash_algorithm="sha256")
    user = stack.create_user("alice", PASSWORD)

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    assert len(stack.token_rows(token[:15])[0]["digest"]) == 64

    assert_django_accepts(stack, token, user)


@knoxgate("login")
def test_token_without_expiry_from_knoxgate_login_authenticates_in_django(start_stack):
    stack = start_stack(token_ttl="none")
    user = stack.create_user("alice", PASSWORD)

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user, ttl=None)

    assert_django_accepts(stack, token, user)


@knoxgate("login")
def test_knoxgate_login_shows_the_expiry_in_djangos_time_zone_as_knox_does(start_stack):
    stack = start_stack(time_zone="America/St_Johns")
    user = stack.create_user("alice", PASSWORD)
    zone = ZoneInfo("America/St_Johns")

    django = stack.django_login("alice", PASSWORD)
    assert django.status_code == 200, describe(django)
    django_expiry = json_body(django)["expiry"]
    row = stack.token_rows(json_body(django)["token"][:15])[0]
    assert django_expiry == knox_expiry_string(row["expiry"], zone), (django_expiry, row)

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user, time_zone=zone)
    ours = knox_expiry_string(stack.token_rows(token[:15])[0]["expiry"], zone)
    # Newfoundland: three and a half hours west of UTC (two and a half in summer), both sides.
    assert django_expiry[-6:] == ours[-6:] in ("-03:30", "-02:30"), (django_expiry, ours)


@knoxgate("login")
@pytest.mark.parametrize("expiry_format", ["%d/%m/%Y %I:%M:%S.%f %p %z %Z (%a %b, day %j)", "none"])
def test_knoxgate_login_writes_knox_expiry_datetime_format(start_stack, expiry_format):
    stack = start_stack(time_zone="America/St_Johns", expiry_datetime_format=expiry_format)
    stack.create_user("alice", PASSWORD)

    def expiry_and_row(response):
        assert response.status_code == 200, describe(response)
        body = json_body(response)
        return body["expiry"], stack.token_rows(body["token"][:15])[0]["expiry"]

    def knox_writes(value):
        if expiry_format == "none":  # DRF's JSON encoder, on the UTC value Django read
            return knox_expiry_string(value)
        return value.astimezone(ZoneInfo("America/St_Johns")).strftime(expiry_format)

    django, django_row = expiry_and_row(stack.django_login("alice", PASSWORD))
    ours, our_row = expiry_and_row(stack.login("alice", PASSWORD))
    assert django == knox_writes(django_row), (django, django_row)
    assert ours == knox_writes(our_row), (ours, our_row)


@knoxgate("login")
def test_knoxgate_login_accepts_json_credentials(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)

    token = assert_knox_login_response(stack, stack.login_json("alice", PASSWORD), user)
    assert_django_accepts(stack, token, user)

    assert_login_refused(stack.login_json("alice", "wrong password"))


@knoxgate("login")
def test_knoxgate_login_sets_last_login_like_django(start_stack):
    stack = start_stack()
    stack.create_user("alice", PASSWORD)
    assert stack.interop("user", "--username", "alice")["last_login"] is None

    before = datetime.now(timezone.utc)
    response = stack.login("alice", PASSWORD)
    assert response.status_code == 200, describe(response)

    last_login = stack.interop("user", "--username", "alice")["last_login"]
    assert last_login is not None, "knox's login fires user_logged_in, which sets last_login"
    assert before - timedelta(seconds=5) <= datetime.fromisoformat(last_login)
    assert datetime.fromisoformat(last_login) <= datetime.now(timezone.utc) + timedelta(seconds=5)


@knoxgate("login")
def test_user_with_non_ascii_password_logs_in_through_knoxgate(start_stack):
    stack = start_stack()
    password = "pässwörd ✓ 密码"
    user = stack.create_user("zoë", password)

    token = assert_knox_login_response(stack, stack.login("zoë", password), user)
    assert_django_accepts(stack, token, user)
    assert_login_refused(stack.login("zoë", "passwörd ✓ 密码"))


# === passwords hashed by Django log in through knoxgate ===


def check_login_with_hasher(start_stack, hasher):
    stack = start_stack(password_hashers=hasher)
    user = stack.create_user("alice", PASSWORD)
    assert user["password_algorithm"] == hasher, user["password"]

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    assert_django_accepts(stack, token, user)

    assert_login_refused(stack.login("alice", PASSWORD + "!"))
    assert_login_refused(stack.login("alice", ""))
    assert_login_refused(stack.login("nobody", PASSWORD))
    # Whatever knoxgate did with the stored hash, Django must still accept the password.
    assert stack.interop("check-password", "--username", "alice", "--password", PASSWORD)["ok"]
    # The site prefers `hasher`, so knoxgate (which writes pbkdf2_sha256 only) left the hash
    # as it was: no re-hash into an algorithm Django would re-hash back. (A re-hash would
    # have landed by now: it runs right after the login's answer.)
    time.sleep(0.5)
    assert stack.interop("user", "--username", "alice")["password"] == user["password"]


@knoxgate("login")
def test_user_created_with_pbkdf2_sha256_logs_in_through_knoxgate(start_stack):
    check_login_with_hasher(start_stack, "pbkdf2_sha256")


@knoxgate("login")
def test_user_created_with_argon2_logs_in_through_knoxgate(start_stack):
    check_login_with_hasher(start_stack, "argon2")


@knoxgate("login")
def test_user_created_with_bcrypt_sha256_logs_in_through_knoxgate(start_stack):
    check_login_with_hasher(start_stack, "bcrypt_sha256")


@knoxgate("login")
def test_user_created_with_scrypt_logs_in_through_knoxgate(start_stack):
    check_login_with_hasher(start_stack, "scrypt")


@knoxgate("login")
def test_user_created_with_md5_logs_in_where_the_site_lists_md5(start_stack):
    # Django refuses an md5 hash unless PASSWORD_HASHERS lists MD5PasswordHasher; knoxgate's
    # sessions.password_hashers says the same.
    check_login_with_hasher(start_stack, "md5")


@knoxgate("login")
def test_a_hash_of_an_unlisted_algorithm_is_refused_by_both(start_stack):
    stack = start_stack()  # Django's default hashers: no md5
    user = stack.create_user("alice", PASSWORD, env={"DJ_PASSWORD_HASHERS": "md5"})
    assert user["password_algorithm"] == "md5"
    assert not stack.interop("check-password", "--username", "alice", "--password", PASSWORD)["ok"]
    assert_login_refused(stack.login("alice", PASSWORD))


@knoxgate("login")
def test_password_rehashed_by_django_login_still_logs_in_through_knoxgate(start_stack):
    stack = start_stack()  # Django prefers pbkdf2_sha256 ...
    user = stack.create_user("alice", PASSWORD, env={"DJ_PASSWORD_HASHERS": "pbkdf2_sha1"})
    assert user["password_algorithm"] == "pbkdf2_sha1"  # ... the user was created with sha1

    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    assert_django_accepts(stack, token, user)

    django_login = stack.django_login("alice", PASSWORD)  # Django re-hashes on its own login
    assert django_login.status_code == 200, describe(django_login)
    rehashed = stack.interop("user", "--username", "alice")
    assert rehashed["password_algorithm"] == "pbkdf2_sha256", rehashed["password"]

    assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)


# === users deactivated in Django ===


@knoxgate("verify", "notify")
def test_user_deactivated_in_django_is_refused_by_knoxgate_verify(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])

    stack.interop("set-active", "--username", "alice", "--active", "0")

    refused_by_knoxgate_within(stack, token, USER_INACTIVE)
    assert_django_refuses(stack, token, USER_INACTIVE)


@knoxgate("login", "notify")
def test_user_deactivated_in_django_cannot_log_in_through_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)
    assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)

    stack.interop("set-active", "--username", "alice", "--active", "0")

    response, _ = eventually(
        lambda: stack.login("alice", PASSWORD),
        lambda r: r.status_code != 200,
        within=REVOCATION_BUDGET,
        what="knoxgate refusing the deactivated user's login",
        show=describe,
    )
    assert_login_refused(response)
    tokens_before = stack.token_count(user["id"])
    assert_login_refused(stack.login("alice", PASSWORD))
    assert stack.token_count(user["id"]) == tokens_before, "a refused login created a token"


@knoxgate("verify", "notify")
def test_user_reactivated_in_django_is_accepted_again_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])
    stack.interop("set-active", "--username", "alice", "--active", "0")
    refused_by_knoxgate_within(stack, token, USER_INACTIVE)

    stack.interop("set-active", "--username", "alice", "--active", "1")

    response, _ = eventually(
        lambda: stack.verify(token),
        lambda r: r.status_code == 200,
        within=REVOCATION_BUDGET,
        what="knoxgate accepting the reactivated user's token",
        show=describe,
    )
    assert_verified(response, user["id"])
    assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)


# === logout in Django is refused by knoxgate ===


@knoxgate("verify", "notify")
def test_logout_in_django_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)
    first = stack.django_login("alice", PASSWORD).json()["token"]
    second = stack.django_login("alice", PASSWORD).json()["token"]
    assert_verified(stack.verify(first), user["id"])
    assert_verified(stack.verify(second), user["id"])

    assert_no_content(stack.django_logout(first))

    refused_by_knoxgate_within(stack, first, INVALID_TOKEN)
    assert_verified(stack.verify(second), user["id"])


@knoxgate("verify", "notify")
def test_logout_all_in_django_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)
    bob = stack.create_user("bob", PASSWORD, tokens=1)
    first = stack.django_login("alice", PASSWORD).json()["token"]
    second = stack.django_login("alice", PASSWORD).json()["token"]
    for token in (first, second):
        assert_verified(stack.verify(token), user["id"])

    assert_no_content(stack.django_logout_all(first))

    refused_by_knoxgate_within(stack, first, INVALID_TOKEN)
    refused_by_knoxgate_within(stack, second, INVALID_TOKEN)
    assert_verified(stack.verify(bob["tokens"][0]["token"]), bob["id"])


@knoxgate("verify", "notify")
def test_token_deleted_through_django_orm_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=2)
    gone, kept = (t["token"] for t in user["tokens"])
    assert_verified(stack.verify(gone), user["id"])

    assert stack.interop("delete-token", "--token-key", gone[:15])["deleted"] == 1

    refused_by_knoxgate_within(stack, gone, INVALID_TOKEN)
    assert_verified(stack.verify(kept), user["id"])


@knoxgate("verify", "notify")
def test_token_deleted_through_django_orm_is_refused_by_two_knoxgate_instances(start_stack):
    from conftest import Service, base_env, free_port, knoxgate_binary, REPO

    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD, tokens=2)
    gone, kept = (t["token"] for t in user["tokens"])
    # A second knoxgate sharing the database and Redis.
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**base_env(), **stack.knoxgate_env, "KNOXGATE_LISTEN": listen, "KNOXGATE_ADMIN_LISTEN": admin}
    second = Service("knoxgate (second)", [str(knoxgate_binary()), "serve"], env=env, cwd=REPO,
                     log=stack.logdir / "knoxgate-second.log")
    try:
        second.wait_ready(f"http://{admin}/readyz", lambda r: r.status_code == 200)

        def verify_second(token):
            return stack.http.get(f"http://{listen}/verify", headers={"Authorization": f"Token {token}"},
                                  timeout=5)

        for token in (gone, kept):
            assert_verified(stack.verify(token), user["id"])
            assert_verified(verify_second(token), user["id"])

        assert stack.interop("delete-token", "--token-key", gone[:15])["deleted"] == 1

        refused_by_knoxgate_within(stack, gone, INVALID_TOKEN)
        response, elapsed = eventually(
            lambda: verify_second(gone),
            lambda r: r.status_code != 200,
            within=REVOCATION_BUDGET,
            what="the second knoxgate refusing the deleted token",
            show=describe,
        )
        assert_token_refused(response, INVALID_TOKEN)
        assert_verified(stack.verify(kept), user["id"])
        assert_verified(verify_second(kept), user["id"])
    finally:
        assert second.stop() == 0


@knoxgate("verify", "notify")
def test_logout_all_through_django_orm_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=2)
    for token in user["tokens"]:
        assert_verified(stack.verify(token["token"]), user["id"])

    assert stack.interop("logout-all", "--username", "alice")["deleted"] == 2

    for token in user["tokens"]:
        refused_by_knoxgate_within(stack, token["token"], INVALID_TOKEN)


@knoxgate("verify", "notify")
def test_token_row_deleted_by_raw_sql_is_refused_by_knoxgate(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])

    assert stack.interop("raw-delete-token", "--token-key", token[:15])["deleted"] == 1

    refused_by_knoxgate_within(stack, token, INVALID_TOKEN)


# === logout in knoxgate is refused by Django ===


@knoxgate("logout")
def test_logout_in_knoxgate_is_refused_by_django(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    from_django = user["tokens"][0]["token"]
    from_knoxgate = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)

    assert_no_content(stack.logout(from_django))

    assert stack.token_rows(from_django[:15]) == []
    assert_django_refuses(stack, from_django)
    assert_token_refused(stack.verify(from_django), INVALID_TOKEN)
    assert_django_accepts(stack, from_knoxgate, user)

    assert_no_content(stack.logout(from_knoxgate))

    assert_django_refuses(stack, from_knoxgate)
    assert_token_refused(stack.verify(from_knoxgate), INVALID_TOKEN)
    assert stack.token_count(user["id"]) == 0


@knoxgate("logout")
def test_logout_all_in_knoxgate_is_refused_by_django(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    bob = stack.create_user("bob", PASSWORD, tokens=1)
    from_django = user["tokens"][0]["token"]
    from_knoxgate = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)

    assert_no_content(stack.logout_all(from_knoxgate))

    assert stack.token_count(user["id"]) == 0
    for token in (from_django, from_knoxgate):
        assert_django_refuses(stack, token)
        assert_token_refused(stack.verify(token), INVALID_TOKEN)
    assert_django_accepts(stack, bob["tokens"][0]["token"], bob)


@knoxgate("logout")
def test_knoxgate_logout_refuses_an_unknown_token_like_knox(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)

    assert_token_refused(stack.logout("0" * 64), INVALID_TOKEN)
    assert_token_refused(stack.logout_all("0" * 64), INVALID_TOKEN)
    assert stack.token_count(user["id"]) == 1


# === django-rest-knox-redis in Django, sharing Redis with knoxgate ===


def redis_key(token_key):
    return f"knox:token:{token_key}"


@knoxgate("verify", "redis-cache")
def test_token_cached_by_django_knox_redis_verifies_in_knoxgate(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]
    assert not stack.redis.exists(redis_key(token["token_key"])), "ORM create does not cache"

    response = assert_django_accepts(stack, token["token"], user)
    assert response.headers["X-Interop-Knox-Redis"] == "miss"
    assert stack.redis.exists(redis_key(token["token_key"])), "knox-redis caches after a miss"

    assert_verified(stack.verify(token["token"]), user["id"])


@knoxgate("login", "redis-cache")
def test_token_from_knoxgate_login_is_written_to_redis_in_knox_redis_format(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    token_key = token[:15]
    eventually(
        lambda: stack.redis.exists(redis_key(token_key)),
        bool,
        within=REVOCATION_BUDGET,
        what=f"knoxgate writing {redis_key(token_key)}",
    )

    entry = stack.interop("redis-entry", "--token-key", token_key)
    assert entry["parsed"] is not None, f"django-rest-knox-redis treats the entry as a miss: {entry}"
    raw = json.loads(entry["raw"])
    row = stack.token_rows(token_key)[0]
    assert raw["schema_version"] == 2
    assert raw["digest"] == row["digest"]
    assert raw["user_id"] == user["id"]
    assert raw["token_key"] == token_key
    assert datetime.fromisoformat(raw["created"]) == row["created"]
    assert datetime.fromisoformat(raw["expiry"]) == row["expiry"]
    assert 0 < entry["ttl"] <= 300, entry

    index = f"knox:user:{user['id']}:tokens"
    assert token_key in stack.redis.smembers(index)
    assert 0 < stack.redis.ttl(index) <= 300

    # knox-redis's six fields, in its order, then knoxgate's one extra field: the user's status
    # (active, staff and superuser flags, group names, for per-route policies), which knox-redis
    # ignores. No username or email unless identity headers are configured.
    knox_redis_fields = ["schema_version", "digest", "user_id", "created", "expiry", "token_key"]
    assert list(raw) == knox_redis_fields + ["knoxgate"], f"fields differ: {entry['raw']}"
    assert raw["knoxgate"] == {
        "is_active": True,
        "is_staff": False,
        "is_superuser": False,
        "groups": [],
    }, entry["raw"]
    assert entry["raw"].startswith(
        json.dumps({k: raw[k] for k in knox_redis_fields})[:-1] + ", "
    ), "knox-redis's bytes, then the extra field"


@knoxgate("login", "redis-cache")
def test_token_from_knoxgate_login_is_a_cache_hit_for_django_knox_redis(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    key = redis_key(token[:15])
    written, _ = eventually(
        lambda: stack.redis.get(key),
        lambda value: value is not None,
        within=REVOCATION_BUDGET,
        what=f"knoxgate writing {key}",
    )

    response = assert_django_accepts(stack, token, user)

    assert response.headers["X-Interop-Knox-Redis"] == "hit", "Django ignored knoxgate's entry"
    assert stack.redis.get(key) == written, "Django rewrote the entry, so it did not use it"


@knoxgate("verify", "notify", "redis-cache")
def test_logout_in_django_with_knox_redis_is_refused_by_knoxgate(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    token = stack.django_login("alice", PASSWORD).json()["token"]
    assert stack.redis.exists(redis_key(token[:15])), "knox-redis's login caches the token"
    assert_verified(stack.verify(token), user["id"])

    assert_no_content(stack.django_logout(token))
    assert not stack.redis.exists(redis_key(token[:15])), "knox-redis removes it on logout"

    refused_by_knoxgate_within(stack, token, INVALID_TOKEN)


@knoxgate("verify", "notify", "redis-cache")
def test_token_deleted_by_raw_sql_is_refused_by_knoxgate_despite_a_stale_knox_redis_entry(
    start_stack,
):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    key = redis_key(token[:15])
    assert_django_accepts(stack, token, user)  # knox-redis caches it
    cached = stack.redis.get(key)
    assert cached is not None, "knox-redis caches after a miss"
    assert_verified(stack.verify(token), user["id"])

    stack.interop("raw-delete-token", "--token-key", token[:15])  # no signal, so no DEL
    # Whatever knoxgate cleaned up, a stale entry is there now, as when a Django request that
    # read the row just before the delete writes its cache entry just after it.
    stack.redis.set(key, cached, ex=300)

    refused_by_knoxgate_within(stack, token, INVALID_TOKEN)
    assert_django_refuses(stack, token)


@knoxgate("logout", "redis-cache")
def test_logout_in_knoxgate_is_refused_by_django_with_knox_redis(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    assert_django_accepts(stack, token, user)

    assert_no_content(stack.logout(token))

    assert_django_refuses(stack, token)
    assert_token_refused(stack.verify(token), INVALID_TOKEN)


@knoxgate("logout", "redis-cache")
def test_logout_in_knoxgate_removes_the_knox_redis_entry(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    token = stack.django_login("alice", PASSWORD).json()["token"]  # cached by knox-redis
    index = f"knox:user:{user['id']}:tokens"
    assert stack.redis.exists(redis_key(token[:15])), "knox-redis's login caches the token"

    assert_no_content(stack.logout(token))

    key = redis_key(token[:15])
    assert not stack.redis.exists(key), f"{key} still in Redis after knoxgate's logout"
    assert token[:15] not in stack.redis.smembers(index), f"{index} still lists {token[:15]}"


@knoxgate("logout", "redis-cache")
def test_logout_all_in_knoxgate_is_refused_by_django_with_knox_redis(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    from_django = stack.django_login("alice", PASSWORD).json()["token"]
    from_knoxgate = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    for token in (from_django, from_knoxgate):
        assert_django_accepts(stack, token, user)

    assert_no_content(stack.logout_all(from_knoxgate))

    for token in (from_django, from_knoxgate):
        assert_django_refuses(stack, token)
        assert_token_refused(stack.verify(token), INVALID_TOKEN)


@knoxgate("logout", "redis-cache")
def test_logout_all_in_knoxgate_removes_the_knox_redis_entries(start_stack):
    stack = start_stack(knox_redis=True)
    user = stack.create_user("alice", PASSWORD)
    tokens = [stack.django_login("alice", PASSWORD).json()["token"] for _ in range(2)]
    index = f"knox:user:{user['id']}:tokens"
    assert stack.redis.smembers(index) == {token[:15] for token in tokens}

    assert_no_content(stack.logout_all(tokens[0]))

    for token in tokens:
        key = redis_key(token[:15])
        assert not stack.redis.exists(key), f"{key} still in Redis after knoxgate's logout-all"
    assert not stack.redis.smembers(index), f"{index} not emptied by knoxgate's logout-all"


# === expired tokens ===


@knoxgate("verify", "expiry")
def test_token_past_its_ttl_is_refused_by_knoxgate_and_its_row_deleted(start_stack):
    stack = start_stack()
    stack.create_user("alice", PASSWORD)
    token = stack.interop("create-token", "--username", "alice", "--ttl", "4")
    assert_verified(stack.verify(token["token"]), token["user_id"])

    wait_for_clock(datetime.fromisoformat(token["expiry"]) + timedelta(milliseconds=50))

    assert_token_refused(stack.verify(token["token"]), INVALID_TOKEN)
    rows_gone_within(stack, token["token_key"])
    assert_django_refuses(stack, token["token"])


@knoxgate("verify", "expiry", "notify")
def test_token_expired_through_django_orm_is_refused_by_knoxgate_and_its_row_deleted(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=2)
    expired, kept = user["tokens"]
    for token in user["tokens"]:
        assert_verified(stack.verify(token["token"]), user["id"])

    stack.interop("set-expiry", "--token-key", expired["token_key"], "--seconds", "-60")

    refused_by_knoxgate_within(stack, expired["token"], INVALID_TOKEN)
    rows_gone_within(stack, expired["token_key"])
    assert_django_refuses(stack, expired["token"])
    assert_verified(stack.verify(kept["token"]), user["id"])
    assert_django_accepts(stack, kept["token"], user)


@knoxgate("verify", "expiry")
def test_token_already_expired_in_the_database_is_refused_by_knoxgate_and_its_row_deleted(
    start_stack,
):
    stack = start_stack()
    stack.create_user("alice", PASSWORD)
    token = stack.interop("create-token", "--username", "alice", "--ttl", "-60")

    assert_token_refused(stack.verify(token["token"]), INVALID_TOKEN)
    rows_gone_within(stack, token["token_key"])


# === Django keeps working with knoxgate's triggers installed ===


@knoxgate("migrate")
def test_django_orm_token_writes_work_with_knoxgate_triggers_installed(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=2)
    created = stack.interop("create-token", "--username", "alice")
    login = stack.django_login("alice", PASSWORD)  # INSERT token + UPDATE last_login
    assert login.status_code == 200, describe(login)
    assert stack.token_count(user["id"]) == 4

    assert stack.interop("delete-token", "--token-key", created["token_key"])["deleted"] == 1
    expired = user["tokens"][0]
    assert stack.interop("set-expiry", "--token-key", expired["token_key"], "--seconds", "-1")["updated"] == 1
    assert_django_refuses(stack, expired["token"])  # knox deletes the expired row itself
    assert_no_content(stack.django_logout(login.json()["token"]))
    assert stack.token_count(user["id"]) == 1
    assert stack.interop("logout-all", "--username", "alice")["deleted"] == 1
    assert stack.token_count() == 0


@knoxgate("migrate")
def test_django_orm_user_writes_work_with_knoxgate_triggers_installed(start_stack):
    stack = start_stack()
    stack.create_user("alice", PASSWORD, tokens=1)

    assert stack.interop("set-active", "--username", "alice", "--active", "0")["is_active"] is False
    assert stack.interop("set-active", "--username", "alice", "--active", "1")["is_active"] is True
    login = stack.django_login("alice", PASSWORD)
    assert login.status_code == 200, describe(login)
    assert stack.interop("user", "--username", "alice")["last_login"] is not None


@knoxgate("migrate", "notify")
def test_django_deletes_a_user_with_tokens_with_knoxgate_triggers_installed(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=2)
    bob = stack.create_user("bob", PASSWORD, tokens=1)
    for token in user["tokens"]:
        assert_verified(stack.verify(token["token"]), user["id"])

    deleted = stack.interop("delete-user", "--username", "alice")

    assert deleted["per_model"] == {"knox.AuthToken": 2, "auth.User": 1}, deleted
    assert stack.token_count(user["id"]) == 0
    for token in user["tokens"]:
        refused_by_knoxgate_within(stack, token["token"], INVALID_TOKEN)
    assert_login_refused(stack.login("alice", PASSWORD))
    assert_verified(stack.verify(bob["tokens"][0]["token"]), bob["id"])


@knoxgate("migrate", "notify")
def test_django_migrate_rerun_is_a_no_op_with_knoxgate_triggers_installed(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])

    migrated = stack.run_manage("migrate", "--no-input")
    assert migrated.returncode == 0, str(migrated)
    assert "No migrations to apply." in migrated.stdout, str(migrated)
    check = stack.run_manage("migrate", "--check")
    assert check.returncode == 0, str(check)

    # knoxgate's triggers survived: a Django-side revocation still reaches it.
    stack.interop("delete-token", "--token-key", token[:15])
    refused_by_knoxgate_within(stack, token, INVALID_TOKEN)


@knoxgate("migrate", "notify")
def test_knoxgate_migrate_rerun_is_idempotent(start_stack):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]

    again = stack.knoxgate_migrate()
    assert again.returncode == 0, str(again)

    assert_verified(stack.verify(token), user["id"])
    stack.interop("delete-token", "--token-key", token[:15])
    refused_by_knoxgate_within(stack, token, INVALID_TOKEN)


@knoxgate("migrate")
def test_knoxgate_migrate_leaves_the_columns_of_django_tables_unchanged(start_stack):
    stack = start_stack()

    def columns(table):
        return [
            name
            for (name,) in stack.sql(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
                table,
            )
        ]

    assert columns("knox_authtoken") == ["digest", "created", "user_id", "expiry", "token_key"]
    assert columns("auth_user") == [
        "id", "password", "last_login", "is_superuser", "username", "first_name",
        "last_name", "email", "is_staff", "is_active", "date_joined",
    ]


# === other cache-consistency modes ===


@knoxgate("verify", "strict-mode")
def test_token_created_by_django_verifies_in_knoxgate_in_strict_mode(start_stack):
    stack = start_stack(cache_consistency="strict")
    user = stack.create_user("alice", PASSWORD, tokens=1)

    assert_verified(stack.verify(user["tokens"][0]["token"]), user["id"])


@knoxgate("verify", "strict-mode")
def test_token_deleted_through_django_orm_is_refused_at_once_by_knoxgate_in_strict_mode(
    start_stack,
):
    stack = start_stack(cache_consistency="strict")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])
    assert_verified(stack.verify(token), user["id"])  # now surely cached

    stack.interop("delete-token", "--token-key", token[:15])

    # strict confirms every cached answer with Postgres: no window at all.
    assert_token_refused(stack.verify(token), INVALID_TOKEN)


@knoxgate("verify", "strict-mode")
def test_user_deactivated_in_django_is_refused_at_once_by_knoxgate_in_strict_mode(start_stack):
    stack = start_stack(cache_consistency="strict")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])
    assert_verified(stack.verify(token), user["id"])

    stack.interop("set-active", "--username", "alice", "--active", "0")

    assert_token_refused(stack.verify(token), USER_INACTIVE)


@knoxgate("verify", "ttl-mode")
def test_token_created_by_django_verifies_in_knoxgate_in_ttl_mode(start_stack):
    stack = start_stack(cache_consistency="ttl")
    user = stack.create_user("alice", PASSWORD, tokens=1)

    assert_verified(stack.verify(user["tokens"][0]["token"]), user["id"])


@knoxgate("verify", "ttl-mode")
def test_token_deleted_through_django_orm_is_refused_by_knoxgate_within_the_cache_ttl_in_ttl_mode(
    start_stack,
):
    max_cache_ttl = 2.0
    stack = start_stack(
        cache_consistency="ttl", knoxgate_env={"KNOXGATE_REDIS_MAX_CACHE_TTL": "2s"}
    )
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]["token"]
    assert_verified(stack.verify(token), user["id"])

    stack.interop("delete-token", "--token-key", token[:15])

    refused_by_knoxgate_within(stack, token, INVALID_TOKEN, within=max_cache_ttl + 1.0)


# === revocations while knoxgate is down ===


@knoxgate("verify", "notify", "redis-cache")
def test_logout_in_django_while_knoxgate_is_down_is_refused_after_its_restart(start_stack):
    stack = start_stack()  # plain knox: Django never touches Redis
    user = stack.create_user("alice", PASSWORD)
    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    key = redis_key(token[:15])
    eventually(lambda: stack.redis.exists(key), bool, within=REVOCATION_BUDGET, what=f"{key} written")
    assert_verified(stack.verify(token), user["id"])

    stack.stop_knoxgate()
    assert_no_content(stack.django_logout(token))
    assert stack.redis.exists(key), "knoxgate's own entry, left stale while it was down"
    stack.start_knoxgate()

    assert_token_refused(stack.verify(token), INVALID_TOKEN)


@knoxgate("verify", "notify", "redis-cache")
def test_user_deactivated_in_django_while_knoxgate_is_down_is_refused_after_its_restart(
    start_stack,
):
    stack = start_stack()
    user = stack.create_user("alice", PASSWORD)
    token = assert_knox_login_response(stack, stack.login("alice", PASSWORD), user)
    key = redis_key(token[:15])
    eventually(lambda: stack.redis.exists(key), bool, within=REVOCATION_BUDGET, what=f"{key} written")
    assert_verified(stack.verify(token), user["id"])

    stack.stop_knoxgate()
    stack.interop("set-active", "--username", "alice", "--active", "0")
    assert stack.redis.exists(key), "knoxgate's own entry, left stale while it was down"
    stack.start_knoxgate()

    assert_token_refused(stack.verify(token), USER_INACTIVE)
