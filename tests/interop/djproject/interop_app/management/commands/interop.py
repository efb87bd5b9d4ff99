"""`manage.py interop <action> ...`: Django-side operations for the interop test driver.

Every action goes through Django's ORM (or, where the name says so, raw SQL on Django's
connection), exactly as application code would, and prints one JSON object on stdout.
"""

import json
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone
from knox.models import get_token_model
from knox.settings import knox_settings


def iso(value):
    return None if value is None else value.isoformat()


def ttl(value):
    """'default' -> knox's TOKEN_TTL, 'none' -> no expiry, else seconds (may be negative)."""
    if value == "default":
        return knox_settings.TOKEN_TTL
    if value.lower() == "none":
        return None
    return timedelta(seconds=float(value))


def user_json(user):
    return {
        "id": user.pk,
        "username": user.get_username(),
        "is_active": user.is_active,
        "last_login": iso(user.last_login),
        "password": user.password,
        "password_algorithm": user.password.split("$", 1)[0],
    }


def token_json(row):
    return {
        "token_key": row.token_key,
        "digest": row.digest,
        "user_id": row.user_id,
        "created": iso(row.created),
        "expiry": iso(row.expiry),
    }


def get_user(username):
    try:
        return get_user_model().objects.get(username=username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no user {username!r}") from None


def create_token(user, ttl_value):
    row, token = get_token_model().objects.create(
        user=user, expiry=ttl(ttl_value), prefix=knox_settings.TOKEN_PREFIX
    )
    return {"token": token, **token_json(row)}


class Command(BaseCommand):
    help = "Django-side operations for the knoxgate interop tests; prints JSON."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)

        p = actions.add_parser("create-user", help="User.objects.create_user (preferred hasher)")
        p.add_argument("--username", required=True)
        p.add_argument("--password", required=True)
        p.add_argument("--inactive", action="store_true")
        p.add_argument("--tokens", type=int, default=0, help="also create N knox tokens")
        p.add_argument("--ttl", default="default", help="token TTL: default | none | seconds")

        p = actions.add_parser("user", help="show a user")
        p.add_argument("--username", required=True)

        p = actions.add_parser("check-password", help="verify with Django's hashers, no re-hash")
        p.add_argument("--username", required=True)
        p.add_argument("--password", required=True)

        p = actions.add_parser("set-active", help="user.is_active = X; user.save()")
        p.add_argument("--username", required=True)
        p.add_argument("--active", choices=["0", "1"], required=True)

        p = actions.add_parser("delete-user", help="user.delete() (Django cascades in Python)")
        p.add_argument("--username", required=True)

        p = actions.add_parser("create-token", help="AuthToken.objects.create(user, ttl, prefix)")
        p.add_argument("--username", required=True)
        p.add_argument("--ttl", default="default", help="default | none | seconds")

        p = actions.add_parser("tokens", help="list knox_authtoken rows")
        p.add_argument("--username")

        p = actions.add_parser("delete-token", help="AuthToken.objects.filter(token_key=..).delete()")
        p.add_argument("--token-key", required=True)

        p = actions.add_parser(
            "raw-delete-token", help="DELETE FROM knox_authtoken by SQL: no signals, no Redis"
        )
        p.add_argument("--token-key", required=True)

        p = actions.add_parser("logout-all", help="AuthToken.objects.filter(user=..).delete()")
        p.add_argument("--username", required=True)

        p = actions.add_parser("set-expiry", help="queryset.update(expiry=now + seconds)")
        p.add_argument("--token-key", required=True)
        p.add_argument("--seconds", type=float, required=True, help="negative = in the past")

        p = actions.add_parser(
            "redis-entry", help="read knox:token:<key> with django-rest-knox-redis's own reader"
        )
        p.add_argument("--token-key", required=True)

    def handle(self, *args, action, **options):
        handler = getattr(self, "do_" + action.replace("-", "_"))
        self.stdout.write(json.dumps(handler(**options)))

    # === users ===

    def do_create_user(self, username, password, inactive, tokens, ttl, **_):
        with transaction.atomic():
            user = get_user_model().objects.create_user(
                username=username, password=password, is_active=not inactive
            )
            created = [create_token(user, ttl) for _ in range(tokens)]
        return {**user_json(user), "tokens": created}

    def do_user(self, username, **_):
        return user_json(get_user(username))

    def do_check_password(self, username, password, **_):
        user = get_user(username)
        return {"ok": check_password(password, user.password), "password": user.password}

    def do_set_active(self, username, active, **_):
        user = get_user(username)
        user.is_active = active == "1"
        user.save()
        return user_json(user)

    def do_delete_user(self, username, **_):
        count, per_model = get_user(username).delete()
        return {"deleted": count, "per_model": per_model}

    # === tokens ===

    def do_create_token(self, username, ttl, **_):
        return create_token(get_user(username), ttl)

    def do_tokens(self, username, **_):
        rows = get_token_model().objects.order_by("created")
        if username is not None:
            rows = rows.filter(user__username=username)
        listed = [token_json(row) for row in rows]
        return {"count": len(listed), "tokens": listed}

    def do_delete_token(self, token_key, **_):
        count, _per_model = get_token_model().objects.filter(token_key=token_key).delete()
        return {"deleted": count}

    def do_raw_delete_token(self, token_key, **_):
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM knox_authtoken WHERE token_key = %s", [token_key])
            return {"deleted": cursor.rowcount}

    def do_logout_all(self, username, **_):
        count, _per_model = get_token_model().objects.filter(user=get_user(username)).delete()
        return {"deleted": count}

    def do_set_expiry(self, token_key, seconds, **_):
        expiry = timezone.now() + timedelta(seconds=seconds)
        updated = get_token_model().objects.filter(token_key=token_key).update(expiry=expiry)
        return {"updated": updated, "expiry": iso(expiry)}

    # === django-rest-knox-redis ===

    def do_redis_entry(self, token_key, **_):
        if not settings.KNOX_REDIS:
            raise CommandError("redis-entry needs DJ_KNOX_REDIS=1")
        from knox_redis.cache import TokenCache

        client = TokenCache._get_redis_client()
        redis_key = TokenCache._make_token_key(token_key)
        raw = client.get(redis_key)
        return {
            "key": redis_key,
            "raw": None if raw is None else raw.decode("utf-8"),
            "ttl": client.ttl(redis_key),
            # None when knox-redis's reader would treat the entry as a miss
            "parsed": TokenCache.get_token(token_key),
        }
