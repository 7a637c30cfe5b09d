"""``create_app(config)``: the aiohttp application, every resource owned by a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from tracker import api, auth, logs_redact
from tracker.applier import Applier
from tracker.callbacks import CallbackSigner
from tracker.config import Config
from tracker.dispatcher import Dispatcher
from tracker.letta import LettaClient
from tracker.manager import Manager
from tracker.metrics import METRICS, Metrics
from tracker.middleware import (
    InFlight,
    error_middleware,
    make_auth_middleware,
    timing_middleware,
)
from tracker.poller import Poller
from tracker.reconcile import reconcile
from tracker.relay import Relay
from tracker.retention import Retention
from tracker.store import Store, open_store
from tracker.wiring import SERVICES, Services
from tracker.workers import Workers

log = logging.getLogger("tracker")
#: the pause before a background loop stopped by an error starts again (``_supervised``)
RESTART_PAUSE_S = 1.0

STORE: web.AppKey[Store] = web.AppKey("store", Store)
LETTA: web.AppKey[LettaClient] = web.AppKey("letta", LettaClient)
FIRST_KEY: web.AppKey[list] = web.AppKey("first_key", list)
WORKERS: web.AppKey[Workers] = web.AppKey("workers", Workers)


def show_first_key(key: str) -> None:
    """The admin key a first start created: printed, not logged (log lines are redacted),
    as it is created (a start-up failing after it would lose it), the only time it shows."""
    print(f"first start: created admin API key (shown once): {key}", flush=True)


def create_app(cfg: Config, show_key: Callable[[str], None] | None = None) -> web.Application:
    """Build the tracker application for ``cfg`` (nothing runs until it is started);
    ``show_key`` shows the first start's admin key (``tracker serve``: ``show_first_key``;
    not ``tracker demo``, whose throwaway database's key its user has no use for)."""
    logs_redact.register(cfg.letta.api_key, cfg.callbacks.secret)
    metrics = Metrics()
    in_flight = InFlight()
    app = web.Application(
        # a callback may be far larger than a submit: each request reads against its own
        # limit (parsing.read_json for the API's bodies)
        client_max_size=max(cfg.server.max_body_bytes, cfg.callbacks.max_body_bytes),
        # timing first: it sees the status error_middleware finally answers with
        middlewares=[timing_middleware(metrics.request, in_flight), error_middleware,
                     make_auth_middleware(lambda key: _authenticate(app, key), api.is_public)],
    )
    app[METRICS] = metrics
    app[FIRST_KEY] = []
    api.add_routes(app)
    app.cleanup_ctx.append(lambda a: _all_or_nothing(a, [
        lambda a: _store_ctx(a, cfg, in_flight, show_key),
        lambda a: _letta_ctx(a, cfg),
        lambda a: _services_ctx(a, cfg),
        _workers_ctx,  # before anything is sent: Letta may call back on the workers' port
        _background_ctx,
    ]))
    app.on_shutdown.append(_workers_stopping)
    return app


async def _all_or_nothing(app: web.Application, steps: list[Callable[[web.Application],
                          AsyncIterator[None]]]) -> AsyncIterator[None]:
    """Enter ``steps`` (cleanup contexts) in order and leave them in reverse, like
    ``app.cleanup_ctx``, but when one fails to start, leave those already entered: aiohttp
    cleans up nothing then (``run_app`` sets up outside its ``try``), and the database's
    threads left open would keep the failed process from exiting."""
    entered: list[contextlib.AbstractAsyncContextManager] = []
    try:
        for step in steps:
            ctx = contextlib.asynccontextmanager(step)(app)
            await ctx.__aenter__()
            entered.append(ctx)
    except BaseException:
        await _leave(entered)
        raise
    yield
    await _leave(entered)


async def _leave(entered: list[contextlib.AbstractAsyncContextManager]) -> None:
    """Leave each, in reverse, each as if all went well: one whose stop fails (the relay's,
    the workers') must not skip those before it, the store's above all, whose threads left
    open would keep the process from exiting. The first failure is raised after."""
    failed: BaseException | None = None
    while entered:
        try:
            await entered.pop().__aexit__(None, None, None)
        except BaseException as e:
            failed = failed or e
    if failed is not None:
        raise failed


async def _authenticate(app: web.Application, key: str | None) -> Any:
    svc = app[SERVICES]
    if not svc.cfg.auth.required:
        return await auth.anonymous_user(svc.store)
    return await auth.authenticate(svc.store, key)


async def _store_ctx(app: web.Application, cfg: Config, in_flight: InFlight,
                     show_key: Callable[[str], None] | None) -> AsyncIterator[None]:
    store = open_store(cfg.database.url, cfg.database.synchronous)
    store.alone = in_flight.lone
    store.lock_for_service()  # before anything is read: a second service stops here
    try:
        await store.open()
        if cfg.auth.required:
            key = await auth.first_start_key(store)
            if key:
                app[FIRST_KEY].append(key)
                if show_key:
                    show_key(key)
    except BaseException:
        await store.close()  # the lock dropped, and the threads open made ended
        raise
    app[STORE] = store
    yield
    await store.close()
    log.info("tracker stopped; database closed")


async def _letta_ctx(app: web.Application, cfg: Config) -> AsyncIterator[None]:
    letta = LettaClient(cfg.letta.base_url, cfg.letta.api_key, cfg.letta.timeout_s)
    letta.on_call = app[METRICS].letta_call
    await letta.start()
    app[LETTA] = letta
    yield
    await letta.close()


async def _services_ctx(app: web.Application, cfg: Config) -> AsyncIterator[None]:
    store, letta = app[STORE], app[LETTA]
    # an empty secret in config: one is generated on first start and kept in the database
    secret = cfg.callbacks.secret or await store.setting("callback_secret",
                                                         secrets.token_urlsafe(32))
    logs_redact.register(secret)
    signer = CallbackSigner(secret, cfg.callback_base())
    manager = Manager(cfg, store, letta, signer.url)
    manager.on_applied = app[METRICS].applied
    app[SERVICES] = Services(cfg=cfg, store=store, letta=letta, signer=signer, manager=manager,
                             dispatcher=Dispatcher(cfg, manager, letta),
                             poller=Poller(cfg, manager, letta),
                             relay=Relay(cfg, store, manager.relay_wakeup),
                             applier=Applier(manager))
    app[SERVICES].poller.on_poll = app[METRICS].polled
    store.flooding = app[SERVICES].applier.flooding
    app[SERVICES].relay.on_outcome = app[METRICS].relay_outcome
    yield


async def _workers_stopping(app: web.Application) -> None:
    """At the stop's start (before the requests in flight are waited for): a worker ending
    from now on is not started again (``Workers.stopping``)."""
    if WORKERS in app:
        app[WORKERS].stopping()


async def _workers_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    if not svc.cfg.callbacks.workers:
        yield
        return
    workers = app[WORKERS] = Workers(svc.cfg, svc.signer.secret, svc.applier, app[METRICS],
                                     down=svc.stopped)
    await workers.start()
    yield
    await workers.stop()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    await svc.relay.start()
    retention = Retention(svc.cfg.retention, svc.store)
    tasks = [_task(svc.store.warm_up(), "warm-up"),
             _task(_reconcile_then_run(svc), "dispatcher"),
             *(_task(_supervised(svc, name, loop), name) for name, loop in (
                 ("callback-applier", svc.applier.run), ("poller", svc.poller.run),
                 ("relay", svc.relay.run), ("retention", retention.run)))]
    yield
    retention.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await svc.dispatcher.stop()
    await svc.relay.stop()


def _task(coro: Coroutine, name: str) -> asyncio.Task:
    return asyncio.create_task(coro, name=f"tracker-{name}")


async def _supervised(svc: Services, name: str, loop: Callable[[], Coroutine]) -> None:
    """Run a background loop for good: one ended by an error no handler of its own caught (a
    bug, a fault where none was expected) is logged and started again after a pause, during
    which ``/healthz`` says degraded. Unwatched, such a task ended silently, its error
    retrieved by nobody, and the service answered ok with nothing dispatched or polled."""
    while True:
        try:
            await loop()
            return
        except Exception:
            log.exception("%s stopped by an error; restarting in %gs", name, RESTART_PAUSE_S)
        svc.stopped.add(name)
        try:
            await asyncio.sleep(RESTART_PAUSE_S)
        finally:
            svc.stopped.discard(name)


async def _reconcile_then_run(svc: Services) -> None:
    """Heal what a crash left half-done before sending anything new."""
    try:
        counts = await reconcile(svc.manager, svc.poller)
        if any(counts.values()):
            log.info("reconciled after start: %s", counts)
    except Exception:
        # not fatal (runs left submitting are rescued by the dispatcher, the rest polled when
        # due), but the runs that ended while the service was down wait for their next poll
        log.exception("reconcile after start failed; the runs it would have settled are"
                      " left to the dispatcher's rescue and the poller")
    await _supervised(svc, "dispatcher", svc.dispatcher.run)
