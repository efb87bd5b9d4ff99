"""The ``request.user`` built from knoxgate's headers without a query.

It is a real instance of the configured user model (``type(user) is get_user_model()``), made
the way Django makes rows it loaded with ``.only(...)``: ``Model.from_db`` with the fields
knoxgate sent, every other field deferred. So it is a saved instance (``_state.adding`` is
False, ``_state.db`` is set) and Django turns it into its primary key in filters and foreign-key
assignments without touching the database.

Reading a field that was not sent loads the rest of the row: all missing fields at once, with
one query (plain deferred loading would cost one query per field), and rereads what knoxgate
vouched for, so that the instance is then the row as it is.

What knoxgate vouched for (``is_active``, and the attributes it sent) was not read from the row:
``save()`` first reads from the row the vouched fields code did not change (one query), so
saving a knoxgate user (say, a profile edit) cannot undo a deactivation or a staff change made
meanwhile, and then saves as Django saves any ``.only()`` instance: the model's own ``save()``
runs, Django works out the fields to write after it, and sends its signals. A vouched field the
code changed is the code's own value from then on, as on any instance: loading the rest of the
row does not reread it, and ``save()`` writes it; a field written is no longer vouched for.

A copy (``copy.copy``, ``copy.deepcopy``) or a pickle of a knoxgate user is a plain deferred
instance: the fields the code set or the row gave, the rest (vouched fields the code did not
change among them) deferred and loaded by Django, one field per query, when read.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import router


#: Where a knoxgate user keeps what knoxgate vouched for: field attname -> the value it vouched.
#: A field leaves it once read from the row.
_VOUCHED = "_knoxgate_vouched"

#: The methods a knoxgate user overrides for itself (instance attributes; the class is untouched).
_OVERRIDES = ("refresh_from_db", "save", "__getstate__")


class _LoadRest:
    """``refresh_from_db`` for a knoxgate user: when Django loads one deferred field, load them
    all, and the vouched ones the code did not change with them, so that reading first_name and
    then last_name costs one query, not two."""

    def __init__(self, user: Any) -> None:
        self.user = user

    def __call__(self, using: Any = None, fields: Any = None, **kwargs: Any) -> None:
        user = self.user
        vouched = user.__dict__.get(_VOUCHED, {})
        # A vouched field the code changed holds the code's value now, not knoxgate's: it is
        # not reread with the rest (that would undo the change before save()).
        for name in [n for n, v in vouched.items() if user.__dict__.get(n, v) != v]:
            del vouched[name]
        if fields is not None:
            deferred = user.get_deferred_fields()
            fields = set(fields)
            if fields and fields <= deferred:
                fields = deferred | set(vouched)
        type(user).refresh_from_db(user, using=using, fields=fields, **kwargs)
        # Without fields Django rereads every loaded field, the vouched ones included.
        for name in list(vouched):
            if fields is None or name in fields:
                del vouched[name]


class _PlainState:
    """``__getstate__`` for a knoxgate user, which ``copy``, ``deepcopy`` and ``pickle`` use
    (through ``Model.__reduce__``): the state of a plain deferred instance. The two overrides
    above act on the user they were made for, so a copy that kept them would save and load the
    original; a vouched field the code did not change was never read from the row, so the copy
    leaves it deferred rather than carry it as if it had been."""

    def __init__(self, user: Any) -> None:
        self.user = user

    def __call__(self) -> dict[str, Any]:
        user = self.user
        state = type(user).__getstate__(user)
        vouched = state.pop(_VOUCHED, {})
        for name in _OVERRIDES:
            state.pop(name, None)
        for name, value in vouched.items():
            if name in state and state[name] == value:
                del state[name]
        return state


class _SaveRead:
    """``save`` for a knoxgate user: the vouched fields the code did not change are read from
    the row first (they hold knoxgate's view of it, not a value read from it or set by the
    application); then Django saves it as it saves any ``.only()`` instance. What was written
    is the row's from then on, no longer knoxgate's view."""

    def __init__(self, user: Any) -> None:
        self.user = user

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        user = self.user
        vouched = user.__dict__.get(_VOUCHED)
        update_fields = kwargs.get("update_fields")
        # Positional arguments (deprecated by Django) and explicit choices are the caller's.
        implicit = not args and update_fields is None and not kwargs.get("force_insert")
        if vouched and implicit:
            untouched = [n for n, v in vouched.items() if user.__dict__.get(n, v) == v]
            if untouched:
                user.refresh_from_db(using=kwargs.get("using"), fields=untouched)
        saved = type(user).save(user, *args, **kwargs)
        if vouched:
            if implicit:
                # Every loaded field was written, the vouched ones among them.
                vouched.clear()
            elif update_fields is not None:
                for name in update_fields:
                    vouched.pop(name, None)
        return saved


def user_model() -> Any:
    """``get_user_model()``, looked up once per ``AUTH_USER_MODEL`` rather than per request
    (keyed by the setting's value, so a changed setting is simply another key)."""
    return _model_named(settings.AUTH_USER_MODEL)


@lru_cache(maxsize=8)
def _model_named(label: str) -> Any:
    return apps.get_model(label, require_ready=False)


@lru_cache(maxsize=8)
def _fields_of(model: Any) -> tuple[str, Any, tuple[str, ...]]:
    """The primary key's attname and converter, and the concrete fields' attnames in the
    model's order: fixed per model class, so worked out once rather than per request."""
    pk = model._meta.pk
    return pk.attname, pk.to_python, tuple(f.attname for f in model._meta.concrete_fields)


def build_user(user_id: int, attributes: dict[str, Any]) -> Any:
    """A user model instance with its pk, ``is_active=True`` (knoxgate only vouches for active
    users) and the given attributes set; everything else deferred."""
    model = user_model()
    pk_attname, pk_to_python, concrete = _fields_of(model)
    known = {pk_attname: pk_to_python(user_id)}
    if "is_active" in concrete:
        known["is_active"] = True
    for name, value in attributes.items():
        if name in concrete:
            known[name] = value
    # from_db wants the values in the model's field order.
    names = [n for n in concrete if n in known]
    db = router.db_for_read(model)
    user = model.from_db(db, names, [known[n] for n in names])
    # Instance attributes shadow the methods for this object only; the class is untouched.
    user.refresh_from_db = _LoadRest(user)
    user.save = _SaveRead(user)
    user.__getstate__ = _PlainState(user)
    setattr(user, _VOUCHED, {n: v for n, v in known.items() if n != pk_attname})
    return user


def user_for(request: Any, user_id: int, attributes: dict[str, Any]) -> Any:
    """The knoxgate user of this Django request, built once and shared by the middleware and
    the DRF class (so a row loaded by one is not loaded again by the other)."""
    user = getattr(request, "_knoxgate_user", None)
    if user is None:
        user = build_user(user_id, attributes)
        request._knoxgate_user = user
    return user
