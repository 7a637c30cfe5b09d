"""Letta's completion callback: the signed URL we hand Letta, and the endpoint it lands on.

Letta's callback is unsigned, so the URL itself is the credential: ``{run_id}.{mac}`` where
mac = HMAC-SHA256(secret, run_id). A bad token is refused before any database work.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from typing import Protocol, TypeVar

from aiohttp import web
from pydantic import ValidationError

from tracker.errors import (
    BadRequest,
    Conflict,
    Invalid,
    LettaUnavailable,
    NotFound,
    Unauthorized,
)
from tracker.letta import LettaClient
from tracker.models import LettaCallback, LettaCallbackShape
from tracker.parsing import MAX_DEPTH, loads, read_body
from tracker.reconcile import names_token
from tracker.store import Store, Verdict

log = logging.getLogger("tracker.callbacks")

PATH = "/callbacks/letta/{token}"
M = TypeVar("M", bound=LettaCallbackShape)
#: a callback that beats its submit's answer is vouched for by Letta (a GET of the run it
#: names): asked again after these pauses while Letta errs, all within VOUCH_BUDGET_S of the
#: 5 s Letta waits for our answer (it never sends the callback again)
VOUCH_PAUSES_S = (0.2, 0.8)
VOUCH_BUDGET_S = 4.0


class CallbackSigner:
    """Makes and checks the per-run callback tokens."""

    def __init__(self, secret: str, public_base: str) -> None:
        self.secret = secret  # handed to the callback workers, which check the same tokens
        # keyed once and copied for each token: hmac.digest keys it again and looks SHA-256
        # up by name on every call (~6 µs a token here against ~4.8; 4% of the event loop's
        # samples in benchmark 1)
        self._keyed = hmac.new(secret.encode(), digestmod="sha256")
        self.public_base = public_base.rstrip("/")

    def _mac(self, run_id: str) -> str:
        mac = self._keyed.copy()
        mac.update(run_id.encode())
        return base64.urlsafe_b64encode(mac.digest()[:24]).decode()

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


def parse_callback(raw: bytes, model: type[M] = LettaCallback) -> M:
    """Validate a callback body: 400 when not JSON, 422 when not Letta's callback shape.
    Filing checks it with ``LettaCallbackShape``, the applier parses it in full."""
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        # the depth check (400), rarely needed: see loads; what else Letta sends is taken
        loads(raw, "callback body", strict=False)
    try:
        # parsed and validated in one pass, in pydantic's Rust: half the time of json.loads
        # and model_validate, on the path Letta waits on
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise BadRequest("callback body is not valid JSON") from None
        raise Invalid([{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                       for err in errors]) from None


class Filing(Protocol):
    """Who hears of callbacks being filed: the applier, or a callback worker's reporter."""

    #: callbacks between their token check and their answer
    receiving: int

    def received(self, run_id: str) -> None:
        """A callback for ``run_id`` was committed to the inbox."""

    def unvouched(self, run_id: str, letta_run_id: str) -> None:
        """A callback for ``run_id``, come before its Letta run id was recorded, named
        ``letta_run_id``, and Letta could not say whether that run is ours (it erred)."""


async def receive(request: web.Request, signer: CallbackSigner, store: Store,
                  letta: LettaClient, filing: Filing, limit: int | None = None) -> str:
    """Check one Letta callback and commit it to the inbox, and return its run's id; the
    handler then answers 200.
    Letta waits at most 5 s and never retries, so nothing else happens on its path (but for
    a callback that beats its submit's answer: Letta is asked whether the run is ours, within
    ``VOUCH_BUDGET_S``): the applier makes the state change just after."""
    run_id = signer.run_id(request.match_info["token"])
    filing.receiving += 1
    try:
        # ``limit``: callbacks.max_body_bytes, where the app's own limit is another's (the
        # service's port takes submits too); checked inline, on Letta's 5 s path
        raw = await (request.read() if limit is None else read_body(request, limit))
        body = parse_callback(raw, LettaCallbackShape)
        verdict = await store.accept_callback(run_id, body.run_id, raw)
        if verdict == Verdict.UNVERIFIED:
            vouched = await _vouched(letta, body.run_id, signer.token(run_id))
            if vouched is None:
                # not filed (unverified, it could record another run's outcome), but not for
                # nothing: a run whose send got no answer is looked up at Letta at once,
                # rather than after dispatch.lookup_after_s (the look vouches for what it finds)
                filing.unvouched(run_id, body.run_id)
                raise LettaUnavailable(f"Letta could not confirm that its run {body.run_id}"
                                       " is this run's: the run is looked up at Letta instead")
            if vouched:
                verdict = await store.accept_callback(run_id, body.run_id, raw, verified=True)
    finally:
        filing.receiving -= 1
    if verdict == Verdict.NO_RUN:
        raise NotFound("run not found")
    if verdict != Verdict.ACCEPTED:
        log.warning("callback for run %s names another Letta run %s", run_id, body.run_id,
                    extra={"run_id": run_id})
        raise Conflict("callback names a different run")
    filing.received(run_id)
    return run_id


def accepted(run_id: str) -> web.Response:
    """The answer to a filed callback, ``{"run_id": ..., "accepted": true}``, formatted as
    bytes (the id is ours: its token checked): Letta waits on it, and json.dumps and a text
    body cost ~3 µs of the ~140 a callback takes (+4% callbacks/s in benchmark 1)."""
    return web.Response(body=b'{"run_id":"%s","accepted":true}' % run_id.encode(),
                        content_type="application/json", charset="utf-8")


async def _vouched(letta: LettaClient, letta_run_id: str, token: str) -> bool | None:
    """Whether Letta created that run with this run's callback URL: the check for a callback
    that beats its own submit, before the tracker has stored the Letta run id. None when
    Letta could not say within ``VOUCH_BUDGET_S``: its errors are asked past twice (a
    Letta that sends callbacks is up, and a 5xx of a moment lost the callback)."""
    try:
        async with asyncio.timeout(VOUCH_BUDGET_S):
            for pause in VOUCH_PAUSES_S:
                try:
                    return await _created_by_us(letta, letta_run_id, token)
                except LettaUnavailable:
                    await asyncio.sleep(pause)
            return await _created_by_us(letta, letta_run_id, token)
    except (LettaUnavailable, TimeoutError):
        return None


async def _created_by_us(letta: LettaClient, letta_run_id: str, token: str) -> bool:
    try:
        letta_run = await letta.get_run(letta_run_id)
    except NotFound:
        return False
    return names_token(letta_run.get("callback_url"), token)
