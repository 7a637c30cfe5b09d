"""The services one running tracker is made of, as stored on the aiohttp app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tracker.applier import Applier
    from tracker.callbacks import CallbackSigner
    from tracker.config import Config
    from tracker.dispatcher import Dispatcher
    from tracker.letta import LettaClient
    from tracker.manager import Manager
    from tracker.poller import Poller
    from tracker.relay import Relay
    from tracker.store import Store


@dataclass
class Services:
    """Everything a handler may reach, built by ``create_app``'s cleanup contexts."""

    cfg: Config
    store: Store
    letta: LettaClient
    signer: CallbackSigner
    manager: Manager
    dispatcher: Dispatcher
    poller: Poller
    relay: Relay
    applier: Applier
    #: background loops stopped by an error, until they start again (``/healthz`` degraded)
    stopped: set[str] = field(default_factory=set)


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
