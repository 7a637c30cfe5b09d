"""Users and API keys: keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid

from tracker.errors import Conflict
from tracker.store import Store, User

KEY_PREFIX = "tk_"


def hash_key(key: str) -> str:
    """Keys are 256 random bits, so a plain SHA-256 is as good as a slow hash here."""
    # a header's bytes that are not UTF-8 come as lone surrogates: hashed as they came, such
    # a key matches none (a 401), where encoding it strictly raised (a 500)
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def create_key(store: Store, name: str, admin: bool = False) -> tuple[User, str]:
    """A new key for user ``name`` (created on first use); returns the user and the key."""
    user = await store.user_by_name(name)
    if user is None:
        user = await store.create_user(name, admin, new_webhook_secret())
    elif user.is_admin != admin:
        raise Conflict(_role_mismatch(user))
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await store.add_key(user.id, f"key-{uuid.uuid4()}", hash_key(key), key[:10])
    return user, key


def _role_mismatch(user: User) -> str:
    # a key has its user's role, fixed when the user was made: an --admin that disagrees
    # with it would hand out a key of the other role than the one asked for
    if user.is_admin:
        return (f"user {user.name!r} is an admin, so its keys are admin keys: pass --admin for"
                " another, or choose a new name for a user key; no key was created")
    return (f"user {user.name!r} exists and is not an admin: --admin cannot make it one;"
            " choose a new name for an admin key; no key was created")


async def authenticate(store: Store, key: str | None) -> User | None:
    """The user a key belongs to, or None (unknown or revoked key)."""
    if not key:
        return None
    return await store.user_for_key(hash_key(key))


async def first_start_key(store: Store) -> str | None:
    """On the very first start, an admin key, so the service is usable; None afterwards."""
    if await store.count_keys():
        return None
    _, key = await create_key(store, "admin", admin=True)
    return key


async def anonymous_user(store: Store) -> User:
    """With ``auth.required = false`` every request acts as this admin user (made by the
    first request; two first requests at once both find none, and one makes it)."""
    user = await store.user_by_name("anonymous")
    if user is not None:
        return user
    try:
        return await store.create_user("anonymous", True, new_webhook_secret())
    except Conflict:
        user = await store.user_by_name("anonymous")
        if user is None:
            raise
        return user
