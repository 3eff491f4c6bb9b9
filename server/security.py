"""API keys: high-entropy random strings, shown once, stored only as their SHA-256, compared in constant time.

A slow password hash (bcrypt, argon2) buys nothing here: the keys carry 256 random bits, so a fast hash
cannot be brute-forced, and it keeps authentication cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

from flylora_runtime.engine.auth import secret_problem

KEY_PREFIX = "flk-"
#: Adapter names: what tenants choose; never reaches the file system or the engine.
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Tenant names (admin-chosen, may appear as metric labels).
TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Internal adapter ids: what the engine and the store see.
INTERNAL_ID_RE = re.compile(r"^fl-[0-9a-f]{32}$")
#: The form of every tenant key :func:`new_api_key` makes: anything else is refused without a lookup.
API_KEY_RE = re.compile(r"flk-[A-Za-z0-9_-]{43}")


def new_api_key() -> str:
    """A fresh key: ``flk-`` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_well_formed(key: str) -> bool:
    """Whether ``key`` has the form of a tenant key (a cheap filter before any lookup)."""
    return API_KEY_RE.fullmatch(key) is not None


def key_hint(key: str) -> str:
    """What a key listing shows to tell keys apart: the prefix and the last four characters."""
    return f"{KEY_PREFIX}...{key[-4:]}"


def admin_key_problem(key: str) -> str | None:
    """Why ``key`` may not be the admin key (a placeholder, too short, too uniform), or None when it may.
    The engine key follows the same rule (:func:`flylora_runtime.engine.auth.secret_problem`)."""
    return secret_problem(key)


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key, the only form stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def new_internal_id() -> str:
    """``fl-`` + 32 lowercase hex characters (a uuid4)."""
    return "fl-" + uuid.uuid4().hex


def parse_bearer(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
