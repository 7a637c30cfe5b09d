"""The body of Letta's ``POST /v1/agents/{agent_id}/messages/async``, as pydantic models.

Mirrors Letta's ``LettaAsyncRequest`` (``letta/schemas/letta_request.py``, ``message.py`` and
``letta_message.py``): same fields, types, defaults and descriptions. The models validate a body
and describe it in the OpenAPI schema; the raw dict, not a re-serialisation, is what gets
forwarded to Letta, so nothing here renames or rewrites a field.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import AliasChoices, Discriminator, Field, Tag, model_validator

from tracker.letta_content import Content, OpenModel, TaggedModel, ToolReturnValue

_UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
AGENT_ID_PATTERN = rf"^agent-{_UUID4}$"
RUN_ID_PATTERN = rf"^run-{_UUID4}$"

MessageType = Literal[
    "system_message",
    "user_message",
    "assistant_message",
    "reasoning_message",
    "hidden_reasoning_message",
    "tool_call_message",
    "tool_return_message",
    "approval_request_message",
    "approval_response_message",
    "summary_message",
    "event_message",
]
MESSAGE_TYPES: tuple[str, ...] = get_args(MessageType)

# The message kinds that answer a run paused with stop_reason "requires_approval".
PAUSE_ANSWERS = frozenset({"approval", "tool_return"})

_OTID = (
    "The offline threading id (OTID). Set by the client to deduplicate requests. Used for "
    "idempotency in background streaming mode — each message in a request must have a unique "
    "OTID. Retries of the same request should reuse the same OTIDs."
)
_GROUP_ID = "The multi-agent group that the message was sent in"
_LEGACY = "Still supported for legacy agent types, but deprecated for letta_v1_agent onward."
# Marks a field deprecated in the schema only; pydantic's Field(deprecated=True) would also
# warn on every attribute read in our own code.
_DEPRECATED: dict[str, Any] = {"deprecated": True}


class MessageCreate(OpenModel):
    """Request to create a message"""

    type: Literal["message"] | None = Field(
        "message", description="The message type to be created."
    )
    role: Literal["user", "system", "assistant"] = Field(description="The role of the participant.")
    content: Content = Field(description="The content of the message.")
    name: str | None = Field(None, description="The name of the participant.")
    otid: str | None = Field(None, description=_OTID)
    sender_id: str | None = Field(
        None, description="The id of the sender of the message, can be an identity id or agent id"
    )
    batch_item_id: str | None = Field(
        None, description="The id of the LLMBatchItem that this message is associated with"
    )
    group_id: str | None = Field(None, description=_GROUP_ID)


class ApprovalReturn(TaggedModel):
    """An approval or denial of one tool call."""

    type: Literal["approval"] = Field("approval", description="The message type to be created.")
    tool_call_id: str = Field(
        description="The ID of the tool call that corresponds to this approval"
    )
    approve: bool = Field(description="Whether the tool has been approved")
    reason: str | None = Field(
        None, description="An optional explanation for the provided approval status"
    )


class ToolReturn(OpenModel):
    """The result of one client-side tool call."""

    type: Literal["tool"] = Field("tool", description="The message type to be created.")
    tool_return: ToolReturnValue = Field(
        description="The tool return value - either a string or list of content parts (text/image)"
    )
    # Letta gives the next four fields no description; these are ours.
    status: Literal["success", "error"] = Field(description="Whether the tool call succeeded.")
    tool_call_id: str = Field(description="The ID of the tool call this return answers.")
    stdout: list[str] | None = Field(None, description="Captured stdout of the tool call.")
    stderr: list[str] | None = Field(None, description="Captured stderr of the tool call.")


class ApprovalCreate(OpenModel):
    """Input to approve or deny a tool call request"""

    type: Literal["approval"] = Field("approval", description="The message type to be created.")
    approvals: list[Annotated[ApprovalReturn | ToolReturn, Field(discriminator="type")]] | None = (
        Field(None, description="The list of approval responses")
    )
    approve: bool | None = Field(
        None, description="Whether the tool has been approved", json_schema_extra=_DEPRECATED
    )
    approval_request_id: str | None = Field(
        None, description="The message ID of the approval request", json_schema_extra=_DEPRECATED
    )
    reason: str | None = Field(
        None,
        description="An optional explanation for the provided approval status",
        json_schema_extra=_DEPRECATED,
    )
    otid: str | None = Field(None, description=_OTID)
    group_id: str | None = Field(None, description=_GROUP_ID)


class ToolReturnCreate(OpenModel):
    """Submit tool return(s) from client-side tool execution."""

    type: Literal["tool_return"] = Field(
        "tool_return", description="The message type to be created."
    )
    tool_returns: list[ToolReturn] = Field(
        description="List of tool returns from client-side execution"
    )
    otid: str | None = Field(None, description=_OTID)
    group_id: str | None = Field(None, description=_GROUP_ID)


def message_kind(message: Any) -> str:
    """Which kind of message this is, decided the way Letta decides it."""
    if not isinstance(message, dict):
        return getattr(message, "type", None) or "message"
    if "type" not in message:
        # Letta's own rule: an untyped message with approval fields is an approval.
        return "approval" if {"approval_request_id", "approve"} & message.keys() else "message"
    kind = message["type"]
    if kind is None:  # MessageCreate alone accepts an explicit null type
        return "message"
    return kind if isinstance(kind, str) else repr(kind)


def _any_message(schema: dict[str, Any]) -> None:
    # A plain message also fits ApprovalCreate (all optional, extras allowed): anyOf, not oneOf.
    items = schema["anyOf"][0]["items"]
    items["anyOf"] = items.pop("oneOf")


Message = Annotated[
    Annotated[MessageCreate, Tag("message")]
    | Annotated[ApprovalCreate, Tag("approval")]
    | Annotated[ToolReturnCreate, Tag("tool_return")],
    Discriminator(message_kind),
]


class ClientToolSchema(OpenModel):
    """Schema for a client-side tool passed in the request."""

    name: str = Field(description="The name of the tool function")
    description: str | None = Field(None, description="Description of what the tool does")
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema for the function parameters"
    )


class ClientSkillSchema(OpenModel):
    """Schema for a client-side skill passed in the request."""

    name: str = Field(description="The name of the skill")
    description: str = Field(description="Description of what the skill does")
    location: str = Field(
        description="Path or location hint for the skill (e.g. skills/my-skill/SKILL.md)"
    )


class AsyncMessageRequest(OpenModel):
    """The body of POST /v1/agents/{agent_id}/messages/async."""

    messages: list[Message] | None = Field(
        None, description="The messages to be sent to the agent.", json_schema_extra=_any_message
    )
    input: Content | None = Field(
        None,
        description="Syntactic sugar for a single user message. "
        "Equivalent to messages=[{'role': 'user', 'content': input}].",
    )
    max_steps: int = Field(
        50, description="Maximum number of steps the agent should take to process the request."
    )
    use_assistant_message: bool = Field(
        True,
        description="Whether the server should parse specific tool call arguments (default "
        f"`send_message`) as `AssistantMessage` objects. {_LEGACY}",
        json_schema_extra=_DEPRECATED,
    )
    assistant_message_tool_name: str = Field(
        "send_message",
        description=f"The name of the designated message tool. {_LEGACY}",
        json_schema_extra=_DEPRECATED,
    )
    assistant_message_tool_kwarg: str = Field(
        "message",
        description=f"The name of the message argument in the designated message tool. {_LEGACY}",
        json_schema_extra=_DEPRECATED,
    )
    include_return_message_types: list[MessageType] | None = Field(
        None,
        description="Only return specified message types in the response. "
        "If `None` (default) returns all messages.",
    )
    # Letta's default here is the bool True on a str field; a str default keeps dumps warning-free.
    enable_thinking: str = Field(
        "True",
        description="If set to True, enables reasoning before responses or tool calls from the "
        "agent.",
        json_schema_extra=_DEPRECATED,
    )
    client_tools: list[ClientToolSchema] | None = Field(
        None,
        description="Client-side tools that the agent can call. When the agent calls a "
        "client-side tool, execution pauses and returns control to the client to execute the "
        "tool and provide the result via a ToolReturn.",
    )
    client_skills: list[ClientSkillSchema] | None = Field(
        None,
        description="Client-side skills available in the environment. These are rendered in the "
        "system prompt's available skills section alongside agent-scoped skills from MemFS.",
    )
    override_model: str | None = Field(
        None,
        description="Model handle to use for this request instead of the agent's default model. "
        "This allows sending a message to a different model without changing the agent's "
        "configuration.",
    )
    # Letta takes `system` for it too (AliasChoices): `{"system": 123}` passed here and was
    # Letta's 422 at dispatch
    override_system: str | None = Field(
        None,
        validation_alias=AliasChoices("override_system", "system"),
        description="Optional per-request system prompt override. When set, this is passed "
        "directly to the underlying LLM request and bypasses the persisted/compiled system "
        "message for that request.",
    )
    include_compaction_messages: bool = Field(
        False,
        description="If True, compaction events emit structured `SummaryMessage` and "
        "`EventMessage` types. If False (default), compaction messages are not included in the "
        "response.",
    )
    return_logprobs: bool = Field(
        False,
        description="If True, returns log probabilities of the output tokens in the response. "
        "Useful for RL training. Only supported for OpenAI-compatible providers (including "
        "SGLang).",
    )
    # Letta describes a range and a dependence on return_logprobs but checks neither: a body it
    # takes, we take
    top_logprobs: int | None = Field(
        None,
        description="Number of most likely tokens to return at each position (0-20). "
        "Requires return_logprobs=True.",
    )
    return_token_ids: bool = Field(
        False,
        description="If True, returns token IDs and logprobs for ALL LLM generations in the agent "
        "step, not just the last one. Uses SGLang native /generate endpoint. Returns 'turns' field "
        "with TurnTokenData for each assistant/tool turn. Required for proper multi-turn RL "
        "training with loss masking.",
    )
    callback_url: str | None = Field(
        None, description="Optional callback URL to POST to when the job completes. The tracker"
        " POSTs the outcome there, signed (Standard Webhooks), retried; it refuses at submit (422,"
        " type url_refused) a URL that is not http(s), or whose host is a loopback, private or"
        " link-local address, unless relay.allow_private (a name resolving to one is refused at"
        " delivery)"
    )

    @model_validator(mode="after")
    def _input_or_messages(self) -> AsyncMessageRequest:
        # Letta's own messages, so a client sees the same 422 from us as from Letta
        if self.input is not None and self.messages is not None:
            raise ValueError("Cannot specify both 'input' and 'messages'. Use one or the other.")
        if self.input is None and self.messages is None:
            raise ValueError("Must specify either 'input' or 'messages'.")
        return self


def _messages(body: dict) -> list:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


def message_otids(body: dict) -> list[str]:
    """The otids present in ``body["messages"]``, in message order."""
    return [
        m["otid"] for m in _messages(body) if isinstance(m, dict) and isinstance(m.get("otid"), str)
    ]


def ensure_otids(body: dict) -> dict:
    """A copy of ``body`` where every message lacking an otid has a fresh uuid4 one.

    A body using ``input`` (no ``messages`` list) is returned as is, not copied.
    """
    if not isinstance(body.get("messages"), list):
        return body
    # copied down to the messages that get an otid (the rest is never mutated): half the
    # time of a deepcopy
    return {**body, "messages": [
        {**m, "otid": str(uuid.uuid4())} if isinstance(m, dict) and m.get("otid") is None
        else m for m in body["messages"]]}


def answers_pause(body: dict) -> bool:
    """True when the messages answer a requires_approval pause (an approval or tool return).
    Letta reads the first message only (agents/helpers.py): an approval after a plain message
    answers nothing, and sent ahead of the queue as an answer it was refused."""
    messages = _messages(body)
    return bool(messages) and message_kind(messages[0]) in PAUSE_ANSWERS
