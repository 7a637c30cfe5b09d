"""Operations commands: ``tracker prune`` and ``tracker backup``, safe while the service runs.

Restoring a backup: stop the service; move the database file aside together with its
``-wal`` and ``-shm`` files (a stale ``-wal`` beside a restored copy would be replayed into
it); copy the backup to the database path; start the service, which applies any migrations
the copy lacks. ``tracker db status`` then shows its schema version and row counts.
The copy's queued runs are marked to be looked for at Letta before they are sent (``backup``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tracker.retention import cutoff, parse_age
from tracker.store import Store, open_store

#: runs per delete transaction: small enough that the live service's writes never wait long
PRUNE_BATCH = 500


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _age(text: str) -> str:
    """argparse type: keep the text as given (for messages), but only if it parses."""
    try:
        parse_age(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


async def prune(store: Store, args: argparse.Namespace) -> int:
    """Delete (or with --dry-run, count) runs that finished more than --older-than ago, and
    are not awaiting a webhook retry."""
    before = cutoff(parse_age(args.older_than))
    counts = await store.prune(before, args.batch, dry_run=args.dry_run)
    scope = (f"runs finished before {before} (more than {args.older_than} ago), and not"
             " awaiting a webhook retry")
    if not counts.get("runs"):
        print(f"no {scope}: nothing to remove")
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{'dry run: ' if args.dry_run else ''}{verb} {counts['runs']} {scope}:")
    for table, n in counts.items():
        print(f"  {table:<18} {n}")
    total = sum(counts.values())
    if args.dry_run:
        print(f"{total} rows in all; nothing was deleted (run again without --dry-run)")
    else:
        print(f"{total} rows removed in all")
    return 0


def _refusal(store: Store, target: Path, force: bool) -> str | None:
    """Why the backup must not be written to ``target``, or None when it may."""
    live = getattr(store, "path", None)  # SQLite only: the file the service writes
    if live and target.resolve() == Path(live).resolve():
        return f"{target} is the live database itself; choose another path"
    if target.is_dir():
        return f"{target} is a directory; give the path of the backup file"
    if not target.parent.is_dir():
        return f"directory {target.parent} does not exist"
    if target.exists() and not force:
        return f"{target} already exists; pass --force to overwrite it"
    return None


async def _verify(path: Path) -> tuple[int, int]:
    """Open the copy as a tracker database: (schema version, run count); as it is, not
    migrated (a copy of an older schema is that schema's)."""
    copy = open_store(f"sqlite:///{path}")
    await copy.open(migrate=False)
    try:
        return await copy.schema_version(), (await copy.table_counts())["runs"]
    finally:
        await copy.close()


async def backup(store: Store, args: argparse.Namespace) -> int:
    """Write a consistent copy of the live database to PATH (SQLite's online backup)."""
    target = Path(args.path)
    problem = _refusal(store, target, args.force)
    if problem:
        print(f"tracker: {problem}", file=sys.stderr)
        return 1
    # written beside the target and renamed into place, so PATH is never a partial copy
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        looked_up = await store.backup(str(partial))
        version, runs = await _verify(partial)
        os.replace(partial, target)
    finally:
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
    print(f"backup written to {target}: {_size(target.stat().st_size)}, {runs} runs, "
          f"schema version {version}" + (
              f"; queued in it: {looked_up} run{'s' if looked_up > 1 else ''}, which a"
              " restore looks for at Letta before sending (the service may send them after"
              " this copy)" if looked_up else ""))
    return 0


def _size(n: int) -> str:
    """``n`` bytes, readably, with the exact figure beside it."""
    size, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({n:,} bytes)"


def add_commands(cmd: Callable, with_store: Callable) -> None:
    """Register ``prune`` and ``backup`` on the ``tracker`` parser."""
    p = cmd("prune", with_store(prune),
            "delete runs (events, results, deliveries) that finished more than an age ago,"
            " and are not awaiting a webhook retry")
    p.add_argument("--older-than", required=True, type=_age, metavar="AGE",
                   help="age like 30d, 12h, 90m or 45s: runs that finished more than AGE"
                        " ago, and are not awaiting a webhook retry")
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.add_argument("--batch", type=_positive, default=PRUNE_BATCH, metavar="N",
                   help=f"runs deleted per transaction (default {PRUNE_BATCH})")
    # any schema: the backup the README asks for before an upgrade is of the database as it is
    b = cmd("backup", with_store(backup, any_schema=True),
            "write a consistent copy of the live database (safe while the service runs)")
    b.add_argument("path", metavar="PATH", help="the backup file to write")
    b.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
