"""Self-checks of the Django side of the interop suite; no knoxgate involved.

They prove that our Django project behaves like the knox (and django-rest-knox-redis) setup
recorded in shared/knox-compat, so a failure in test_interop.py points at knoxgate.
Run alone with: pytest -m "not knoxgate".
"""

import hashlib
import json
from datetime import datetime, timezone

import pytest

from conftest import describe

PASSWORD = "correct horse battery staple"


def test_django_login_token_authenticates_and_logout_revokes_it(start_stack):
    stack = start_stack(knoxgate=False)
    user = stack.create_user("alice", PASSWORD)

    login = stack.django_login("alice", PASSWORD)
    assert login.status_code == 200, describe(login)
    assert list(login.json()) == ["expiry", "token"]
    assert login.text == json.dumps(login.json(), separators=(",", ":"))
    token = login.json()["token"]

    protected = stack.django_protected(token)
    assert protected.status_code == 200, describe(protected)
    assert protected.json() == {"username": "alice", "user_id": user["id"]}

    assert stack.django_logout(token).status_code == 204
    refused = stack.django_protected(token)
    assert refused.status_code == 401, describe(refused)
    assert refused.json() == {"detail": "Invalid token."}
    assert refused.headers["WWW-Authenticate"] == "Token"

    bad = stack.django_login("alice", "wrong")
    assert bad.status_code == 401, describe(bad)
    assert bad.json() == {"detail": "Invalid username/password."}
    assert bad.headers["WWW-Authenticate"] == 'Basic realm="api"'


def test_django_settings_follow_the_environment(start_stack):
    stack = start_stack(knoxgate=False, token_prefix="myapp_", hash_algorithm="sha256", token_ttl="none")
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]
    assert token["token"].startswith("myapp_") and len(token["token"]) == 70
    assert token["token_key"] == token["token"][:15]
    assert token["digest"] == hashlib.sha256(token["token"].encode()).hexdigest()
    assert token["expiry"] is None


@pytest.mark.parametrize("hasher", ["pbkdf2_sha256", "argon2", "bcrypt_sha256", "scrypt"])
def test_django_creates_users_with_the_preferred_hasher(start_stack, hasher):
    stack = start_stack(django=False, knoxgate=False, password_hashers=hasher)
    user = stack.create_user("alice", PASSWORD)
    assert user["password_algorithm"] == hasher
    assert stack.interop("check-password", "--username", "alice", "--password", PASSWORD)["ok"]


def test_django_knox_redis_caches_a_token_on_first_use_and_hits_afterwards(start_stack):
    stack = start_stack(knoxgate=False, knox_redis=True)
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]

    first = stack.django_protected(token["token"])
    assert first.status_code == 200, describe(first)
    assert first.headers["X-Interop-Knox-Redis"] == "miss"

    entry = stack.interop("redis-entry", "--token-key", token["token_key"])
    assert entry["parsed"] is not None, entry
    assert entry["parsed"]["digest"] == token["digest"]
    assert 0 < entry["ttl"] <= 300
    assert stack.redis.smembers(f"knox:user:{user['id']}:tokens") == {token["token_key"]}

    second = stack.django_protected(token["token"])
    assert second.headers["X-Interop-Knox-Redis"] == "hit"

    assert stack.django_logout(token["token"]).status_code == 204
    assert not stack.redis.exists(f"knox:token:{token['token_key']}")


def test_django_knox_redis_hits_a_compact_entry_written_by_another_program(start_stack):
    stack = start_stack(knoxgate=False, knox_redis=True)
    user = stack.create_user("alice", PASSWORD, tokens=1)
    token = user["tokens"][0]
    payload = json.dumps(
        {
            "schema_version": 2,
            "digest": token["digest"],
            "user_id": user["id"],
            "created": token["created"],
            "expiry": token["expiry"],
            "token_key": token["token_key"],
        },
        separators=(",", ":"),
    )
    key = f"knox:token:{token['token_key']}"
    stack.redis.set(key, payload, ex=300)

    response = stack.django_protected(token["token"])
    assert response.status_code == 200, describe(response)
    assert response.headers["X-Interop-Knox-Redis"] == "hit"
    assert stack.redis.get(key) == payload


def test_django_login_with_knox_redis_writes_the_entry(start_stack):
    stack = start_stack(knoxgate=False, knox_redis=True)
    stack.create_user("alice", PASSWORD)
    login = stack.django_login("alice", PASSWORD)
    assert login.status_code == 200, describe(login)
    token = login.json()["token"]
    entry = stack.interop("redis-entry", "--token-key", token[:15])
    assert entry["parsed"] is not None, entry
    assert entry["raw"].startswith('{"schema_version": 2, "digest": ')


def test_management_commands_change_rows_through_the_orm(start_stack):
    stack = start_stack(django=False, knoxgate=False)
    alice = stack.create_user("alice", PASSWORD, tokens=3)
    stack.create_user("bob", PASSWORD, tokens=1)
    assert stack.token_count() == 4

    first, second, third = alice["tokens"]
    assert stack.interop("delete-token", "--token-key", first["token_key"])["deleted"] == 1
    assert stack.interop("raw-delete-token", "--token-key", second["token_key"])["deleted"] == 1
    moved = stack.interop("set-expiry", "--token-key", third["token_key"], "--seconds", "-60")
    assert moved["updated"] == 1
    assert stack.token_rows(third["token_key"])[0]["expiry"] < datetime.now(timezone.utc)
    assert stack.interop("logout-all", "--username", "alice")["deleted"] == 1
    assert stack.token_count(alice["id"]) == 0

    assert not stack.interop("set-active", "--username", "bob", "--active", "0")["is_active"]
    deleted = stack.interop("delete-user", "--username", "bob")
    assert deleted["per_model"] == {"knox.AuthToken": 1, "auth.User": 1}
    assert stack.token_count() == 0
