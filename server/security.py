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

KEY_PREFIX = "flk-"
#: Adapter names: what tenants choose; never reaches the file system or the engine.
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Tenant names (admin-chosen, may appear as metric labels).
TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Internal adapter ids: what the engine and the store see.
INTERNAL_ID_RE = re.compile(r"^fl-[0-9a-f]{32}$")


def new_api_key() -> str:
    """A fresh key: ``flk-`` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


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
