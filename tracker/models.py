"""Pydantic models of what the tracker serves and receives (besides the submit body, which is
``tracker.letta_request``): Letta's Run plus the ``tracker`` object, Letta's callback, query
parameters, and the small bodies of the other routes. The OpenAPI document is built from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracker import clock
from tracker.states import State

StatusLit = Literal["created", "running", "completed", "failed", "cancelled"]
RUN_ID_RE = r"^run-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class TrackerInfo(BaseModel):
    """What only the tracker knows about a run."""

    state: State = Field(description="the tracker's lifecycle state")
    letta_run_id: str | None = Field(None, description="Letta's run id once Letta has the run")
    user_id: str = Field(description="the user the run belongs to")
    queued_at: str = Field(description="when the tracker recorded the submit")
    submitted_at: str | None = Field(None, description="when Letta accepted the run")
    completed_at: str | None = Field(None, description="when Letta finished the run")
    recorded_at: str | None = Field(None, description="when the tracker learnt the outcome")
    completed_via: str | None = Field(
        None, description="how the tracker learnt the outcome: callback (Letta's callback), poll"
                          " (the poller; also a run it gave up as lost), reconcile (a look at"
                          " Letta at start-up), api (a queued run cancelled before it reached"
                          " Letta) or dispatch (Letta refused the run at submit)")
    poll_count: int = Field(0, description="how many times the poller checked the run")
    attempts: int = Field(0, description="how many times the run was sent to Letta")
    error: str | None = Field(None, description="why the run was refused, failed or lost")
    error_code: int | None = Field(None, description="Letta's HTTP status when it refused")
    relay: str | None = Field(
        None, description="state of the latest delivery to the user's callback_url "
                          "(in one run's view; null in listings)")


class RunOut(BaseModel):
    """Letta's Run schema, with the tracker's run id, plus the ``tracker`` object."""

    id: str = Field(description="the tracker's run id (run-<uuid4 form>, sorting by its millisecond"
                    " of creation)")
    status: StatusLit
    created_at: str | None = None
    completed_at: str | None = None
    agent_id: str
    conversation_id: str | None = None
    base_template_id: str | None = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    request_config: dict[str, Any] | None = None
    stop_reason: str | None = None
    callback_url: str | None = Field(
        None, description="the user's own callback_url, given at submit: the run's outcome is"
                          " POSTed there, signed (see GET .../deliveries). Refused at submit"
                          " (422, type url_refused): a URL that is not http(s), or whose host is"
                          " a loopback, private or link-local address, unless"
                          " relay.allow_private (a name resolving to one is refused at delivery)")
    callback_sent_at: str | None = None
    callback_status_code: int | None = None
    callback_error: str | None = None
    ttft_ns: int | None = None
    total_duration_ns: int | None = None
    tracker: TrackerInfo


class _Object(BaseModel):
    """Any JSON object, its content not built: what the shape check needs of one."""

    model_config = ConfigDict(extra="ignore")


class CallbackResultShape(BaseModel):
    """``metadata.result``, as filing checks it."""

    model_config = ConfigDict(extra="ignore")
    messages: list[_Object] = []
    stop_reason: _Object | None = None
    usage: _Object | None = None


class CallbackMetadataShape(BaseModel):
    model_config = ConfigDict(extra="ignore")
    result: CallbackResultShape | None = None


class LettaCallbackShape(BaseModel):
    """Letta's callback body as filing checks it: the same documents pass as for
    ``LettaCallback``, but only the run id is built (the applier parses the rest). Its
    messages, about all of its ~2 KB, are skipped in pydantic's Rust: ~10 µs a callback
    instead of ~18, on the path Letta waits on."""

    model_config = ConfigDict(extra="ignore")
    run_id: str = Field(pattern=r"^run-[0-9a-fA-F-]{8,}$")
    status: StatusLit
    completed_at: str | None = None
    metadata: CallbackMetadataShape | None = None

    @field_validator("completed_at")
    @classmethod
    def _timestamp(cls, v: str | None) -> str | None:
        # Letta sends a naive ISO 8601 time; anything else would poison the record
        if v is not None:
            clock.parse(v)
        return v


class CallbackResult(BaseModel):
    """``metadata.result`` of Letta's callback."""

    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = []
    stop_reason: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class CallbackMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    result: CallbackResult | None = None
    error: Any = None


class LettaCallback(LettaCallbackShape):
    """The body Letta POSTs to ``callback_url`` when a run ends."""

    model_config = ConfigDict(extra="allow")
    metadata: CallbackMetadata | None = None  # type: ignore[assignment]


#: most run_ids one cancel names (Letta sets none; a client cancelling more sends several)
MAX_CANCEL_RUN_IDS = 1000


class CancelRequest(BaseModel):
    """Letta's cancel body: the runs to cancel, or none for all the agent's active runs.
    Other keys are ignored, as Letta's model ignores them."""

    #: bounded: each is looked up on its own (a 1 MiB body of empty ids held the loop seconds)
    run_ids: list[str] | None = Field(None, max_length=MAX_CANCEL_RUN_IDS)


#: more agent_ids than this are refused: each agent (with several statuses, each agent and
#: status) is a branch of the page's merged query, and SQLite takes at most 500
MAX_AGENT_IDS = 50


class RunListParams(BaseModel):
    """``GET /v1/runs``: Letta's filters plus the tracker's."""

    model_config = ConfigDict(extra="forbid")
    agent_id: str | None = None
    agent_ids: list[str] | None = Field(
        None, max_length=MAX_AGENT_IDS,
        description="Letta's repeatable filter: runs of any of these agents (agent_id, when"
                    " given, wins, as in Letta)")
    statuses: list[StatusLit] | None = None
    background: bool | None = None
    stop_reason: str | None = None
    conversation_id: str | None = None
    before: str | None = Field(None, description="cursor: runs before this run id in the order")
    after: str | None = Field(None, description="cursor: runs after this run id in the order")
    limit: int = Field(100, ge=1, le=1000)
    order: Literal["asc", "desc"] = "desc"
    order_by: Literal["created_at"] = "created_at"
    active: bool | None = None
    ascending: bool | None = Field(None, description="deprecated Letta alias of order")
    state: list[State] | None = Field(None, description="tracker states")
    created_after: str | None = Field(None, description="ISO 8601 lower bound (inclusive)")
    created_before: str | None = Field(None, description="ISO 8601 upper bound (exclusive)")
    completed_via: Literal["callback", "poll", "reconcile", "api", "dispatch"] | None = Field(
        None, description="how the outcome was learnt (the run's tracker.completed_via)")
    callback_missed: bool | None = Field(
        None, description="true: learnt by poll or reconcile; false: learnt by callback")
    user_id: str | None = Field(None, description="admin only: one user's runs")


class MessageListParams(BaseModel):
    """``GET /v1/runs/{id}/messages``: Letta's pagination."""

    model_config = ConfigDict(extra="forbid")
    before: str | None = None
    after: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    order: Literal["asc", "desc"] = "asc"
    order_by: Literal["created_at"] = "created_at"  # Letta's SDK sends it


class EventOut(BaseModel):
    """One entry of a run's timeline."""

    id: int
    at: str
    source: str
    kind: str
    state: str | None = None
    status: str | None = None
    detail: dict[str, Any] | None = None


class RunGetParams(BaseModel):
    """``GET /v1/runs/{id}``: what comes with the run (Letta's own takes nothing)."""

    model_config = ConfigDict(extra="forbid")
    include: list[Literal["events"]] | None = Field(
        None, description="events: the run's timeline with it, in one request")


class RunDetailOut(RunOut):
    """One run; with ``?include=events``, its timeline too."""

    events: list[EventOut] | None = Field(
        None, description="with ?include=events: the run's timeline, as GET .../events gives it")


class UsageOut(BaseModel):
    """Letta's run usage."""

    model_config = ConfigDict(extra="allow")
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    version: str
    stopped: list[str] | None = Field(
        None, description="background loops stopped by an error, restarting (degraded)")


class ErrorOut(BaseModel):
    """Error body, as Letta (FastAPI) answers."""

    detail: Any

