"""Commands that work on the database directly: keys and db."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from tracker import auth
from tracker.cli_args import add_config_option
from tracker.cli_render import data
from tracker.migrations import LATEST
from tracker.relay import rotate_secret
from tracker.store import Store

console = Console()


async def keys_create(store: Store, args: argparse.Namespace) -> int:
    user, key = await auth.create_key(store, args.name, args.admin)
    role = "admin" if user.is_admin else "user"
    print(f"webhook signing secret of {user.name!r} (verifies deliveries to your callback_url):")
    print(f"  {user.webhook_secret}")
    print(f"created a key for {role} {user.name!r} ({user.id}); it is shown only once:")
    print(key)
    return 0


async def keys_rotate_webhook_secret(store: Store, args: argparse.Namespace) -> int:
    user = await store.user_by_name(args.name)
    if user is None:
        print(f"tracker: no user named {args.name!r}", file=sys.stderr)
        return 1
    secret = await rotate_secret(store, user.id)
    print(f"new webhook signing secret of {user.name!r}; deliveries carry signatures with both"
          " the new and the previous secret until the next rotation:")
    print(secret)
    return 0


async def keys_list(store: Store, args: argparse.Namespace) -> int:
    table = Table("key id", "prefix", "user", "admin", "created", "revoked")
    for k in await store.list_keys():
        # as data (cli_render.data): a user's name with brackets would be read as markup
        table.add_row(*map(data, (k.id, k.prefix + "…", k.user_name,
                                  "yes" if k.is_admin else "", k.created_at,
                                  k.revoked_at or "")))
    console.print(table)
    return 0


async def keys_revoke(store: Store, args: argparse.Namespace) -> int:
    # `keys list` shows a prefix as "tk_AbCdEfG…": pasted as shown, it is the prefix
    n = await store.revoke_key(args.key.removesuffix("…"))
    if not n:
        print(f"tracker: no active key matches {args.key!r}", file=sys.stderr)
        return 1
    print(f"revoked {n} key(s)")
    return 0


async def db_status(store: Store, args: argparse.Namespace) -> int:
    # opened without migrating (see add_commands): checking a database before an upgrade
    # must not start the upgrade, which takes minutes on a long history (README)
    version = await store.schema_version()
    print(f"schema version {version} (latest {LATEST}){schema_note(version)}")
    for table, n in (await store.table_counts()).items():
        print(f"  {table:<18} {n}")
    return 0


def schema_note(version: int) -> str:
    """What ``db status`` says after the version when it is not this tracker's."""
    if version < LATEST:
        return (f": {LATEST - version} migration(s) pending, run `tracker db migrate` with the"
                " service stopped")
    return ": newer than this tracker" if version > LATEST else ""


async def db_migrate(store: Store, args: argparse.Namespace) -> int:
    # open() already applied pending migrations; say what the database is at now, and that
    # it is new when it is (else a first run read as the no-op of a second)
    if args.created:
        print(f"created the database {os.path.abspath(store.path)}")  # type: ignore[attr-defined]
    print(f"schema is at version {await store.schema_version()} (latest {LATEST})")
    return 0


def add_commands(cmd: Callable, with_store: Callable) -> None:
    keys = cmd("keys", None, "manage API keys").add_subparsers(dest="keys_cmd", required=True)
    create = keys.add_parser("create", help="create a key (printed once, last line)")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true")
    add_config_option(create, nested=True)
    create.set_defaults(fn=with_store(keys_create))
    lst = keys.add_parser("list", help="list keys")
    add_config_option(lst, nested=True)
    lst.set_defaults(fn=with_store(keys_list))
    revoke = keys.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key")
    add_config_option(revoke, nested=True)
    revoke.set_defaults(fn=with_store(keys_revoke))
    rotate = keys.add_parser("rotate-webhook-secret",
                             help="new webhook signing secret for a user (printed, last line)")
    rotate.add_argument("name")
    add_config_option(rotate, nested=True)
    rotate.set_defaults(fn=with_store(keys_rotate_webhook_secret))
    db = cmd("db", None, "database").add_subparsers(dest="db_cmd", required=True)
    st = db.add_parser("status", help="schema version, pending migrations and row counts"
                       " (migrates nothing)")
    add_config_option(st, nested=True)
    st.set_defaults(fn=with_store(db_status, any_schema=True))
    mg = db.add_parser("migrate", help="apply pending migrations")
    add_config_option(mg, nested=True)
    mg.set_defaults(fn=with_store(db_migrate, creates=True))
