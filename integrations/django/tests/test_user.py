"""request.user costs no query for what knoxgate sent, and exactly one for everything else."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.permissions import IsAdminUser, IsAuthenticated

from kgtest.models import Note
from knoxgate_django.user import build_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    u = django_user_model.objects.create_user(
        "alice", "alice@example.com", "pw", first_name="Alice", last_name="Liddell"
    )
    return u


@pytest.fixture
def boss(django_user_model):
    return django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")


def headers_for(user, **extra):
    return {"X-Auth-User-Id": str(user.pk), **extra}


def sql_of(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries]


def test_built_user_is_a_saved_model_instance(alice):
    with CaptureQueriesContext(connection) as ctx:
        u = build_user(alice.pk, {"username": "alice"})
        assert type(u) is get_user_model()
        assert u.pk == alice.pk and u == alice
        assert u._state.adding is False and u._state.db == "default"
        assert u.is_authenticated and not u.is_anonymous and u.is_active
        assert u.get_username() == "alice"
        assert hash(u) == hash(alice)
        assert u.get_deferred_fields() >= {"first_name", "password", "email"}
    assert sql_of(ctx) == []


def test_filter_and_fk_assignment_cost_no_user_query(alice):
    u = build_user(alice.pk, {})
    Note.objects.create(owner=alice, text="one")
    with CaptureQueriesContext(connection) as ctx:
        qs = Note.objects.filter(owner=u)
        note = Note(text="two")
        note.owner = u
        note.save()
        assert qs.count() == 2
        assert Note.objects.filter(owner__in=[u]).count() == 2
    # the INSERT and the two counts; nothing reads auth_user
    assert len(ctx.captured_queries) == 3
    assert not any('FROM "auth_user"' in s for s in sql_of(ctx)), sql_of(ctx)


def test_unsent_field_loads_whole_row_once(alice):
    # knoxgate's view of the username is older than the row's.
    u = build_user(alice.pk, {"username": "alice-before"})
    with CaptureQueriesContext(connection) as ctx:
        assert u.first_name == "Alice"
        assert u.last_name == "Liddell"
        assert u.email == "alice@example.com"
        assert u.date_joined == alice.date_joined
        assert u.check_password("pw")
        assert u.is_staff is False
    assert len(ctx.captured_queries) == 1, sql_of(ctx)
    assert 'FROM "auth_user"' in ctx.captured_queries[0]["sql"]
    # The same query rereads what knoxgate vouched for: the instance is now the row as it is.
    assert u.get_username() == "alice" and u.get_deferred_fields() == set()


def test_lazy_load_of_a_missing_row_raises_does_not_exist(alice):
    model = get_user_model()
    u = build_user(alice.pk + 1000, {})
    with pytest.raises(model.DoesNotExist):
        u.first_name  # noqa: B018


def test_drf_permissions_with_flags_cost_nothing(rf, alice, boss):
    request = rf.get("/")
    with CaptureQueriesContext(connection) as ctx:
        staff = build_user(boss.pk, {"is_staff": True, "is_superuser": True})
        plain = build_user(alice.pk, {"is_staff": False, "is_superuser": False})
        for user, admin in ((staff, True), (plain, False)):
            request.user = user
            assert IsAuthenticated().has_permission(request, None)
            assert IsAdminUser().has_permission(request, None) is admin
        assert staff.has_perm("kgtest.add_note")  # active superuser: no permission lookup
    assert sql_of(ctx) == []


def test_is_admin_without_flag_header_costs_one_query(rf, boss):
    request = rf.get("/")
    request.user = build_user(boss.pk, {})
    with CaptureQueriesContext(connection) as ctx:
        assert IsAdminUser().has_permission(request, None)
    assert len(ctx.captured_queries) == 1


# --- through real requests: everything the request does, counted ---


def test_plain_view_notes_cost_only_the_note_queries(client, alice, django_assert_num_queries):
    with django_assert_num_queries(2):  # INSERT note + SELECT count
        r = client.post("/plain/notes", headers=headers_for(alice))
    assert r.json() == {"count": 1}
    assert Note.objects.get().owner_id == alice.pk


def test_drf_view_notes_cost_only_the_note_queries(client, alice, django_assert_num_queries):
    with django_assert_num_queries(2):
        r = client.post("/api/notes", headers=headers_for(alice))
    assert (r.status_code, r.json()) == (200, {"count": 1})


def test_drf_whoami_costs_nothing(client, alice, django_assert_num_queries):
    with django_assert_num_queries(0):
        r = client.get("/api/whoami", headers=headers_for(alice))
    assert r.json()["id"] == alice.pk


def test_sent_attributes_cost_nothing(client, boss, django_assert_num_queries):
    h = headers_for(
        boss,
        **{"X-Auth-Username": "boss", "X-Auth-Email": "boss@example.com", "X-Auth-Is-Staff": "true", "X-Auth-Is-Superuser": "true"},
    )
    with django_assert_num_queries(0):
        r = client.get("/api/names", headers=h)
        assert client.get("/api/admin", headers=h).status_code == 200
    assert r.json() == {"username": "boss", "email": "boss@example.com", "is_staff": True, "is_superuser": True}


def test_admin_view_flags(client, alice, boss, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert client.get("/api/admin", headers=headers_for(alice, **{"X-Auth-Is-Staff": "false"})).status_code == 403
    # Without the flag header the row is read (one query) and the answer is the database's.
    with django_assert_num_queries(1):
        assert client.get("/api/admin", headers=headers_for(boss)).status_code == 200
    with django_assert_num_queries(1):
        assert client.get("/api/admin", headers=headers_for(alice)).status_code == 403


@pytest.mark.parametrize("value", ["yes", "True", "", "2"])
def test_bad_flag_values(client, alice, value):
    r = client.get("/api/open", headers=headers_for(alice, **{"X-Auth-Is-Staff": value}))
    if value == "":
        # an empty header is "not sent": the field stays deferred
        assert r.status_code == 200 and r.json()["authenticated"]
    else:
        assert r.status_code == 401


def test_unsent_fields_one_query_in_a_view(client, alice, django_assert_num_queries):
    with django_assert_num_queries(1):
        r = client.get("/plain/profile", headers=headers_for(alice))
    assert r.json()["first_name"] == "Alice"
    with django_assert_num_queries(1):
        r = client.get("/api/profile", headers=headers_for(alice))
    assert r.json() == {"first_name": "Alice", "last_name": "Liddell"}


def test_utf8_username_header(client, django_user_model, django_assert_num_queries):
    u = django_user_model.objects.create_user("zoë", "z@example.com", "pw")
    raw = "zoë".encode("utf-8").decode("latin-1")  # what a WSGI server puts in the environ
    with django_assert_num_queries(0):
        r = client.get("/api/names", headers={"X-Auth-User-Id": str(u.pk), "X-Auth-Username": raw, "X-Auth-Email": "z@example.com", "X-Auth-Is-Staff": "0", "X-Auth-Is-Superuser": "0"})
    assert r.json()["username"] == "zoë"



def test_save_does_not_write_back_what_knoxgate_vouched_for(alice):
    model = get_user_model()
    u = build_user(alice.pk, {"username": "alice", "is_staff": False})
    # While the request runs, an admin deactivates alice and makes her staff.
    model.objects.filter(pk=alice.pk).update(is_active=False, is_staff=True)
    u.first_name = "Al"
    with CaptureQueriesContext(connection) as ctx:
        u.save()
    # The vouched fields are read from the row, then the loaded fields written.
    kinds = [q["sql"].split()[0] for q in ctx.captured_queries]
    assert kinds == ["SELECT", "UPDATE"], sql_of(ctx)
    row = model.objects.get(pk=alice.pk)
    assert (row.first_name, row.last_name) == ("Al", "Liddell")
    assert (row.is_active, row.is_staff) == (False, True), "the admin's change stands"
    assert (u.is_active, u.is_staff) == (False, True), "and the instance holds the row's values"


def test_a_field_written_is_no_longer_vouched_for(alice):
    model = get_user_model()
    u = build_user(alice.pk, {"email": "alice@example.com"})
    u.is_active = False
    u.save()
    u.is_active = True  # knoxgate's value again, but the code's now: written
    u.save()
    assert model.objects.get(pk=alice.pk).is_active is True
    u.email = "new@example.com"
    u.save()
    u.email = "alice@example.com"
    u.save()
    assert model.objects.get(pk=alice.pk).email == "alice@example.com"


def test_save_runs_the_models_own_save_and_sends_its_signals(alice, monkeypatch):
    from django.db.models.signals import post_save

    model = get_user_model()
    model_save = model.save

    def save(self, *args, **kwargs):
        # A common override: what it changes must be written.
        self.email = self.email.lower()
        return model_save(self, *args, **kwargs)

    monkeypatch.setattr(model, "save", save)
    model.objects.filter(pk=alice.pk).update(email="Alice@Example.com")
    for sent in ({"email": "Alice@Example.com"}, {}):
        u = build_user(alice.pk, {"username": "alice", **sent})
        u.first_name = "Al"
        u.save()
        row = model.objects.get(pk=alice.pk)
        assert (row.first_name, row.email) == ("Al", "alice@example.com"), sent
        model.objects.filter(pk=alice.pk).update(email="Alice@Example.com", first_name="Alice")


def test_a_save_with_nothing_changed_writes_and_signals_as_for_any_only_instance(alice):
    from django.db.models.signals import post_save

    model = get_user_model()
    seen = []

    def saved(sender, instance, update_fields, **kwargs):
        seen.append(update_fields)

    post_save.connect(saved, sender=model)
    try:
        build_user(alice.pk, {"username": "alice"}).save()
    finally:
        post_save.disconnect(saved, sender=model)
    assert seen and {"username", "is_active"} <= set(seen[0]), seen


def test_save_writes_vouched_fields_the_code_changed(alice):
    model = get_user_model()
    u = build_user(alice.pk, {"is_staff": False})
    u.is_staff = True
    u.is_active = False
    u.save()
    row = model.objects.get(pk=alice.pk)
    assert (row.is_active, row.is_staff, row.first_name) == (False, True, "Alice")
    # An explicit update_fields is the caller's choice, as for any instance.
    u2 = build_user(alice.pk, {})
    u2.save(update_fields=["is_active"])
    assert model.objects.get(pk=alice.pk).is_active is True


def test_after_the_row_loads_save_writes_the_row_as_read(alice):
    model = get_user_model()
    u = build_user(alice.pk, {"is_staff": False})
    model.objects.filter(pk=alice.pk).update(is_staff=True)
    assert u.first_name == "Alice"  # loads the row, is_staff with it
    assert u.is_staff is True
    u.last_name = "L."
    u.save()
    row = model.objects.get(pk=alice.pk)
    assert (row.is_staff, row.last_name, row.is_active) == (True, "L.", True)


def test_loading_the_rest_keeps_what_the_code_changed(alice):
    model = get_user_model()
    u = build_user(alice.pk, {"username": "alice", "email": "alice@example.com"})
    u.email = "alice@new.example"
    u.is_active = False
    # full_clean() reads every field: the rest of the row loads, and the two changes survive it
    # (as on any .only() instance) to be written by save().
    u.full_clean()
    assert (u.email, u.is_active, u.first_name) == ("alice@new.example", False, "Alice")
    u.save()
    row = model.objects.get(pk=alice.pk)
    assert (row.email, row.is_active, row.username, row.first_name) == (
        "alice@new.example", False, "alice", "Alice")


def test_copies_and_pickles_are_plain_deferred_instances(alice):
    import copy
    import pickle

    model = get_user_model()
    original = build_user(alice.pk, {"username": "alice", "is_staff": False})
    for clone in (copy.copy(original), copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert clone == alice and clone._state.adding is False and type(clone) is model
        # None of the original's overrides: they act on the user they were made for.
        assert not {"save", "refresh_from_db", "__getstate__", "_knoxgate_vouched"} & set(clone.__dict__)
        # What knoxgate vouched for was never read from the row: deferred on the copy, read
        # from the row by Django (one field per query, as for any deferred instance).
        assert {"is_active", "username", "is_staff"} <= clone.get_deferred_fields()
        with CaptureQueriesContext(connection) as ctx:
            assert (clone.first_name, clone.last_name) == ("Alice", "Liddell")
        assert len(ctx.captured_queries) == 2, sql_of(ctx)

    # A copy's save() writes the copy, and what the row says meanwhile stands.
    model.objects.filter(pk=alice.pk).update(is_active=False)
    clone = copy.copy(original)
    clone.first_name = "Copy"
    clone.save()
    row = model.objects.get(pk=alice.pk)
    assert (row.first_name, row.is_active) == ("Copy", False)
    assert original.__dict__.get("first_name") is None and original._knoxgate_vouched["is_active"] is True
    # The original still loads its row in one query and keeps its own overrides.
    with CaptureQueriesContext(connection) as ctx:
        assert (original.first_name, original.is_active) == ("Copy", False)
    assert len(ctx.captured_queries) == 1
