"""The SQLite store's users and their API keys."""

from __future__ import annotations

import sqlite3
import uuid

from tracker import clock
from tracker.errors import Conflict
from tracker.sqlite_db import SQLiteDB
from tracker.store import ApiKey, User


class Accounts(SQLiteDB):
    """Users and API keys (a base of ``SQLiteStore``)."""

    async def create_user(self, name: str, is_admin: bool, webhook_secret: str) -> User:
        user = User(id=f"user-{uuid.uuid4()}", name=name, is_admin=is_admin,
                    created_at=clock.iso(), webhook_secret=webhook_secret)
        try:
            await self._write(lambda db: db.execute(
                "INSERT INTO users (id, name, is_admin, created_at, webhook_secret)"
                " VALUES (?, ?, ?, ?, ?)", (user.id, name, int(is_admin), user.created_at,
                                            webhook_secret)))
        except sqlite3.IntegrityError:  # names are unique
            raise Conflict(f"a user named {name!r} exists already") from None
        return user

    async def _user(self, where: str, arg: str) -> User | None:
        rows = await self._lookup(
            "SELECT u.id, u.name, u.is_admin, u.created_at, u.webhook_secret,"
            f" u.webhook_secret_old FROM users u {where}", (arg,)
        )
        if not rows:
            return None
        r = rows[0]
        return User(id=r[0], name=r[1], is_admin=bool(r[2]), created_at=r[3],
                    webhook_secret=r[4], webhook_secret_old=r[5])

    async def get_user(self, user_id: str) -> User | None:
        return await self._user("WHERE u.id = ?", user_id)

    async def user_by_name(self, name: str) -> User | None:
        return await self._user("WHERE u.name = ?", name)

    async def user_for_key(self, key_hash: str) -> User | None:
        return await self._user(
            "JOIN api_keys k ON k.user_id = u.id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            key_hash,
        )

    async def add_key(self, user_id: str, key_id: str, key_hash: str, prefix: str) -> None:
        await self._write(lambda db: db.execute(
            "INSERT INTO api_keys (id, user_id, key_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?)", (key_id, user_id, key_hash, prefix, clock.iso())))

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._read(
            "SELECT k.id, k.user_id, u.name, k.prefix, k.created_at, k.revoked_at, u.is_admin"
            " FROM api_keys k JOIN users u ON u.id = k.user_id ORDER BY k.created_at"
        )
        return [ApiKey(*r[:6], is_admin=bool(r[6])) for r in rows]

    async def revoke_key(self, key_id_or_prefix: str) -> int:
        return await self._write(lambda db: db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE (id = ? OR prefix = ?)"
            " AND revoked_at IS NULL", (clock.iso(), key_id_or_prefix, key_id_or_prefix)
        ).rowcount)

    async def count_keys(self) -> int:
        return (await self._read("SELECT count(*) FROM api_keys"))[0][0]

    async def rotate_webhook_secret(self, user_id: str, new_secret: str) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE users SET webhook_secret_old = webhook_secret, webhook_secret = ?"
            " WHERE id = ?", (new_secret, user_id)))
