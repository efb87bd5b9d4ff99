"""Shared helpers: signing keys made with `cryptography`, assertions signed with PyJWT (the
library the package verifies with), JWKS files, raw ASGI calls and spare ports.

Environment:
  KNOXGATE_BIN  knoxgate binary for the SQL comparison tests. Unset: those tests skip. Set (as
                run-tests.sh and scripts/test.sh do): they must pass, a missing binary fails.
  KGDJ_PG_HOST / KGDJ_PG_PORT / KGDJ_PG_USER  Postgres (default 127.0.0.1 / 5432 / postgres)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

HERE = Path(__file__).resolve().parent

AUDIENCE = "kgtest-app"
ISSUER = "knoxgate"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}

    def sign(self, sub: Any, *, headers: dict | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"sub": sub, "iat": now, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


def new_key(alg: str = "EdDSA", kid: str | None = None) -> SigningKey:
    private = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    return SigningKey(kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg, private)


def write_jwks(path: Path, *keys: SigningKey) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [k.jwk() for k in keys]}))
    tmp.replace(path)
    return path


@pytest.fixture
def ed_key() -> SigningKey:
    return new_key("EdDSA")


@pytest.fixture
def es_key() -> SigningKey:
    return new_key("ES256")


@pytest.fixture
def jwks_file(tmp_path: Path, ed_key: SigningKey, es_key: SigningKey) -> Path:
    return write_jwks(tmp_path / "jwks.json", ed_key, es_key)


@pytest.fixture
def assertion_settings(settings, jwks_file: Path):
    """KNOXGATE with assertion verification from a JWKS file (not yet required)."""
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        "JWKS_FILE": str(jwks_file),
        "ASSERTION_AUDIENCE": AUDIENCE,
    }
    return settings


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def asgi_get(
    path: str, headers: list[tuple[bytes, bytes]], client: str = "127.0.0.1", headers_as: Any = list
) -> tuple[int, dict]:
    """One GET through Django's real ASGI handler with exactly these raw headers (no client
    library in between that would merge or normalise them), in the scope as ``headers_as``
    makes them (ASGI allows any iterable)."""
    from django.core.asgi import get_asgi_application

    app = get_asgi_application()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers_as([(b"host", b"testserver"), *headers]),
        "client": (client, 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # The client stays connected; Django cancels this wait once the response is sent.
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body) if body else {}
