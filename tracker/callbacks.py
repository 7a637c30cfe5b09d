"""Letta's completion callback: the signed URL we hand Letta, and the endpoint it lands on.

Letta's callback is unsigned, so the URL itself is the credential: ``{run_id}.{mac}`` where
mac = HMAC-SHA256(secret, run_id). A bad token is refused before any database work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging

from aiohttp import web
from pydantic import ValidationError

from tracker.errors import Conflict, Invalid, NotFound, Unauthorized
from tracker.manager import Manager, Observation
from tracker.models import LettaCallback
from tracker.parsing import loads
from tracker.states import Source
from tracker.store import RunRecord

log = logging.getLogger("tracker.callbacks")

PATH = "/callbacks/letta/{token}"


class CallbackSigner:
    """Makes and checks the per-run callback tokens."""

    def __init__(self, secret: str, public_base: str) -> None:
        self._key = secret.encode()
        self.public_base = public_base.rstrip("/")

    def _mac(self, run_id: str) -> str:
        digest = hmac.new(self._key, run_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()

    def token(self, run_id: str) -> str:
        return f"{run_id}.{self._mac(run_id)}"

    def url(self, run_id: str) -> str:
        """The callback_url sent to Letta for this run."""
        return f"{self.public_base}/callbacks/letta/{self.token(run_id)}"

    def run_id(self, token: str) -> str:
        """The run a token names; raises when the token is malformed or forged."""
        run_id, dot, mac = token.rpartition(".")
        if not dot or not run_id.startswith("run-"):
            raise NotFound("Not Found")
        if not hmac.compare_digest(mac.encode(), self._mac(run_id).encode()):
            raise Unauthorized("invalid callback token")
        return run_id


def parse_callback(raw: bytes) -> LettaCallback:
    """Validate a callback body: 400 when not JSON, 422 when not Letta's callback shape."""
    data = loads(raw, "callback body")
    try:
        return LettaCallback.model_validate(data)
    except ValidationError as e:
        raise Invalid([{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                       for err in e.errors(include_url=False)]) from None


async def receive(request: web.Request, signer: CallbackSigner, manager: Manager) -> dict:
    """Apply one Letta callback; the handler answers 200 once it is committed."""
    run_id = signer.run_id(request.match_info["token"])
    body = parse_callback(await request.read())
    run = await manager.store.get_run(run_id)
    if run is None:
        raise NotFound("run not found")
    if not await _names_our_run(manager, run, body.run_id, signer.url(run_id)):
        log.warning("callback for run %s names another Letta run %s", run_id, body.run_id,
                    extra={"run_id": run_id, "agent_id": run.agent_id})
        raise Conflict("callback names a different run")
    updated = await manager.apply_remote(run, Observation.from_callback(body), Source.CALLBACK)
    return {"run_id": updated.id, "state": updated.state.value}


async def _names_our_run(manager: Manager, run: RunRecord, letta_run_id: str, ours: str) -> bool:
    """Whether the callback's run is this run's Letta run. Before the submit has stored
    Letta's answer we cannot compare ids: then Letta itself says whether that run was created
    with our callback URL (one call, only for runs faster than their own submit)."""
    if run.letta_run_id:
        return run.letta_run_id == letta_run_id
    try:
        letta_run = await manager.letta.get_run(letta_run_id)
    except NotFound:
        return False
    return letta_run.get("callback_url") == ours
