"""The Letta request body models: every field, default and constraint, and the otid helpers."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tracker.letta_content import (
    Base64Image,
    ImageContent,
    LettaImage,
    OmittedReasoningContent,
    ReasoningContent,
    RedactedReasoningContent,
    SummarizedReasoningContent,
    TextContent,
    ToolCallContent,
    ToolReturnContent,
    UrlImage,
)
from tracker.letta_request import (
    AGENT_ID_PATTERN,
    MESSAGE_TYPES,
    RUN_ID_PATTERN,
    ApprovalCreate,
    ApprovalReturn,
    AsyncMessageRequest,
    MessageCreate,
    ToolReturn,
    ToolReturnCreate,
    answers_pause,
    ensure_otids,
    message_otids,
)

OTID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
IMAGE_SOURCES = [
    {"type": "url", "url": "https://example.com/cat.png"},
    {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=", "detail": "low"},
    {
        "type": "letta",
        "file_id": "file-1",
        "media_type": "image/png",
        "data": "iVBORw0KGgo=",
        "detail": "auto",
    },
]
IMAGES = [{"type": "image", "source": source} for source in IMAGE_SOURCES]
CONTENT_PARTS = [
    {"type": "text", "text": "hello", "signature": "sig-1"},
    *IMAGES,
    {"type": "tool_call", "id": "call-1", "name": "lookup", "input": {"q": 1}, "signature": "s"},
    {"type": "tool_return", "tool_call_id": "call-1", "content": "42", "is_error": False},
    {"type": "reasoning", "is_native": True, "reasoning": "thinking", "signature": "sig-2"},
    {"type": "redacted_reasoning", "data": "opaque"},
    {"type": "omitted_reasoning", "signature": "sig-3"},
]
SUMMARIZED = {
    "type": "summarized_reasoning",
    "id": "rs_1",
    "summary": [{"index": 0, "text": "first"}, {"index": 1, "text": "second"}],
    "encrypted_content": "gAAAA",
}
TOOL_RETURN = {
    "type": "tool",
    "status": "success",
    "tool_call_id": "call-1",
    "tool_return": [{"type": "text", "text": "ok"}, *IMAGES],
    "stdout": ["printed"],
    "stderr": [],
}
MESSAGES = [
    {
        "type": "message",
        "role": "user",
        "content": [*CONTENT_PARTS, SUMMARIZED],
        "name": "ann",
        "otid": OTID,
        "sender_id": "identity-1",
        "batch_item_id": "batch_item-1",
        "group_id": "group-1",
    },
    {"role": "system", "content": "Be brief."},
    {"type": None, "role": "assistant", "content": "Sure."},
    {
        "type": "approval",
        "approvals": [
            {"type": "approval", "tool_call_id": "call-1", "approve": False, "reason": "no"},
            TOOL_RETURN,
        ],
        "approve": True,
        "approval_request_id": "message-1",
        "reason": "fine",
        "group_id": "group-1",
        "otid": "otid-approval",
    },
    {
        "type": "tool_return",
        "tool_returns": [{"status": "error", "tool_call_id": "call-2", "tool_return": "boom"}],
        "group_id": "group-1",
        "otid": "otid-tool-return",
    },
]
FULL_BODY: dict[str, Any] = {
    "messages": MESSAGES,
    "max_steps": 7,
    "use_assistant_message": False,
    "assistant_message_tool_name": "reply",
    "assistant_message_tool_kwarg": "text",
    "include_return_message_types": list(MESSAGE_TYPES),
    "enable_thinking": "true",
    "client_tools": [
        {
            "name": "pick_file",
            "description": "Ask the user for a file",
            "parameters": {"type": "object", "properties": {"glob": {"type": "string"}}},
        },
        {"name": "bare_tool"},
    ],
    "client_skills": [
        {"name": "deploy", "description": "Deploys", "location": "skills/deploy/SKILL.md"}
    ],
    "override_model": "openai/gpt-4o-mini",
    "override_system": "You are terse.",
    "include_compaction_messages": True,
    "return_logprobs": True,
    "top_logprobs": 20,
    "return_token_ids": True,
    "callback_url": "https://example.com/cb",
}


def minimal(**fields: Any) -> dict[str, Any]:
    """A valid body plus the given fields."""
    return {"input": "hi", **fields}


def errors(body: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        AsyncMessageRequest.model_validate(body)
    return info.value.errors(include_url=False)


def error_at(body: Any, loc: tuple) -> dict[str, Any]:
    """The one error for ``body``, which must be at ``loc``."""
    found = errors(body)
    assert [e["loc"] for e in found] == [loc], found
    return found[0]


# --- every field accepted -------------------------------------------------------------------


def test_full_body_uses_every_field_and_validates():
    request = AsyncMessageRequest.model_validate(FULL_BODY)
    assert request.model_fields_set == set(AsyncMessageRequest.model_fields) - {"input"}
    assert request.model_extra == {}
    assert [type(m) for m in request.messages] == [
        MessageCreate,
        MessageCreate,
        MessageCreate,
        ApprovalCreate,
        ToolReturnCreate,
    ]
    assert [m.role for m in request.messages[:3]] == ["user", "system", "assistant"]
    assert request.max_steps == 7 and request.top_logprobs == 20
    assert request.include_return_message_types == list(MESSAGE_TYPES)
    assert request.client_tools[0].parameters["type"] == "object"
    assert (
        request.client_tools[1].description is None and request.client_tools[1].parameters is None
    )
    assert request.client_skills[0].location == "skills/deploy/SKILL.md"


def test_full_body_has_every_content_part_source_and_return_kind():
    request = AsyncMessageRequest.model_validate(FULL_BODY)
    user, _, _, approval, tool_return = request.messages
    assert [type(p) for p in user.content] == [
        TextContent,
        ImageContent,
        ImageContent,
        ImageContent,
        ToolCallContent,
        ToolReturnContent,
        ReasoningContent,
        RedactedReasoningContent,
        OmittedReasoningContent,
        SummarizedReasoningContent,
    ]
    assert [type(p.source) for p in user.content[1:4]] == [UrlImage, Base64Image, LettaImage]
    assert user.content[-1].summary[1].text == "second"
    assert [type(a) for a in approval.approvals] == [ApprovalReturn, ToolReturn]
    assert [type(p) for p in approval.approvals[1].tool_return] == [
        TextContent,
        *[ImageContent] * 3,
    ]
    assert approval.approve is True and approval.approval_request_id == "message-1"
    assert tool_return.tool_returns[0].tool_return == "boom"
    assert tool_return.tool_returns[0].type == "tool"  # defaulted outside a tagged union


def test_input_takes_every_content_part_including_summarized_reasoning():
    body = {k: v for k, v in FULL_BODY.items() if k != "messages"}
    request = AsyncMessageRequest.model_validate({**body, "input": [*CONTENT_PARTS, SUMMARIZED]})
    assert request.model_fields_set == set(AsyncMessageRequest.model_fields) - {"messages"}
    assert type(request.input[-1]) is SummarizedReasoningContent
    assert AsyncMessageRequest.model_validate({"input": "plain"}).input == "plain"


def test_lax_scalars_are_accepted_as_letta_accepts_them():
    request = AsyncMessageRequest.model_validate(minimal(max_steps="12", return_logprobs="true"))
    assert request.max_steps == 12 and request.return_logprobs is True


def test_callback_url_is_not_validated_like_letta():
    request = AsyncMessageRequest.model_validate(minimal(callback_url="not-a-url"))
    assert request.callback_url == "not-a-url"


def test_empty_messages_list_is_accepted_like_letta():
    assert AsyncMessageRequest.model_validate({"messages": []}).messages == []


# --- defaults --------------------------------------------------------------------------------


def test_top_level_defaults():
    request = AsyncMessageRequest.model_validate({"input": "hi"})
    assert request.model_dump(exclude={"input"}) == {
        "messages": None,
        "max_steps": 50,
        "use_assistant_message": True,
        "assistant_message_tool_name": "send_message",
        "assistant_message_tool_kwarg": "message",
        "include_return_message_types": None,
        "enable_thinking": "True",
        "client_tools": None,
        "client_skills": None,
        "override_model": None,
        "override_system": None,
        "include_compaction_messages": False,
        "return_logprobs": False,
        "top_logprobs": None,
        "return_token_ids": False,
        "callback_url": None,
    }


def test_message_defaults():
    message = AsyncMessageRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]}
    ).messages[0]
    assert isinstance(message, MessageCreate)
    assert (message.type, message.name, message.otid, message.sender_id) == (
        "message",
        None,
        None,
        None,
    )
    assert (message.batch_item_id, message.group_id) == (None, None)


def test_untyped_message_with_approval_fields_is_an_approval_like_letta():
    body = {"messages": [{"approve": True, "approval_request_id": "message-1"}]}
    approval = AsyncMessageRequest.model_validate(body).messages[0]
    assert isinstance(approval, ApprovalCreate)
    assert (approval.type, approval.approvals, approval.reason) == ("approval", None, None)


def test_nested_defaults():
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "source": {"type": "letta", "file_id": "f"}}],
            },
            {"type": "tool_return", "tool_returns": [TOOL_RETURN]},
        ]
    }
    image, tool_return = AsyncMessageRequest.model_validate(body).messages
    source = image.content[0].source
    assert (source.media_type, source.data, source.detail) == (None, None, None)
    summarized = AsyncMessageRequest.model_validate(
        {"input": [{"type": "summarized_reasoning", "id": "r", "summary": []}]}
    ).input[0]
    assert summarized.encrypted_content is None
    bare = ToolReturn.model_validate({"status": "success", "tool_call_id": "c", "tool_return": ""})
    assert (bare.type, bare.stdout, bare.stderr) == ("tool", None, None)


# --- constraints refused, at the right place -------------------------------------------------

PARTS_LOC = ("input", "parts")


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        (minimal(max_steps="many"), ("max_steps",), "int_parsing"),
        (minimal(max_steps=2.5), ("max_steps",), "int_from_float"),
        (minimal(max_steps=None), ("max_steps",), "int_type"),
        (
            minimal(include_return_message_types=["user_message", "ping"]),
            ("include_return_message_types", 1),
            "literal_error",
        ),
        (
            minimal(include_return_message_types="user_message"),
            ("include_return_message_types",),
            "list_type",
        ),
        (minimal(use_assistant_message="maybe"), ("use_assistant_message",), "bool_parsing"),
        (minimal(enable_thinking=None), ("enable_thinking",), "string_type"),
        (minimal(callback_url=5), ("callback_url",), "string_type"),
        (minimal(override_model=["a"]), ("override_model",), "string_type"),
        (minimal(override_system=1), ("override_system",), "string_type"),
        # Letta's other name for it (AliasChoices)
        (minimal(system=123), ("system",), "string_type"),
        (minimal(return_token_ids="x"), ("return_token_ids",), "bool_parsing"),
        (
            minimal(include_compaction_messages="x"),
            ("include_compaction_messages",),
            "bool_parsing",
        ),
        (
            minimal(assistant_message_tool_name=None),
            ("assistant_message_tool_name",),
            "string_type",
        ),
        (minimal(assistant_message_tool_kwarg=1), ("assistant_message_tool_kwarg",), "string_type"),
        (minimal(client_tools=[{"description": "x"}]), ("client_tools", 0, "name"), "missing"),
        (
            minimal(client_tools=[{"name": "t", "parameters": "{}"}]),
            ("client_tools", 0, "parameters"),
            "dict_type",
        ),
        (
            minimal(client_skills=[{"name": "s", "description": "d"}]),
            ("client_skills", 0, "location"),
            "missing",
        ),
        ({"messages": "hi"}, ("messages",), "list_type"),
        ({"input": 5}, ("input",), "string_or_list_type"),
        ({"input": {"type": "text", "text": "x"}}, ("input",), "string_or_list_type"),
    ],
)
def test_top_level_constraints(body, loc, error_type):
    assert error_at(body, loc)["type"] == error_type


@pytest.mark.parametrize("fields", [{"top_logprobs": 5}, {"top_logprobs": 25},
                                    {"top_logprobs": -1, "return_logprobs": True},
                                    {"top_logprobs": 0, "return_logprobs": False}])
def test_top_logprobs_is_taken_as_letta_takes_it(fields):
    """Letta's model says "(0-20). Requires return_logprobs=True." but checks neither (a plain
    optional int): a body Letta takes must not be a 422 here."""
    assert AsyncMessageRequest.model_validate(minimal(**fields)).top_logprobs == \
        fields["top_logprobs"]
    with pytest.raises(ValidationError):
        AsyncMessageRequest.model_validate(minimal(top_logprobs="many"))


def message(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi", **fields}]}


MSG = ("messages", 0)
USER = (*MSG, "message")
APPROVAL = (*MSG, "approval")
TOOL_RETURNS = (*MSG, "tool_return", "tool_returns", 0)


def approval(*approvals: Any) -> dict[str, Any]:
    return {"messages": [{"type": "approval", "approvals": list(approvals)}]}


def tool_return(**fields: Any) -> dict[str, Any]:
    item = {"status": "success", "tool_call_id": "c", "tool_return": "ok", **fields}
    return {"messages": [{"type": "tool_return", "tool_returns": [item]}]}


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        (message(role="tool"), (*USER, "role"), "literal_error"),
        (message(role=None), (*USER, "role"), "literal_error"),
        ({"messages": [{"role": "user"}]}, (*USER, "content"), "missing"),
        (message(type="note"), MSG, "union_tag_invalid"),
        (message(type=5), MSG, "union_tag_invalid"),
        (message(type=["message"]), MSG, "union_tag_invalid"),
        ({"messages": ["hi"]}, USER, "model_type"),
        (message(otid=1), (*USER, "otid"), "string_type"),
        (message(name=1), (*USER, "name"), "string_type"),
        (message(sender_id=1), (*USER, "sender_id"), "string_type"),
        (message(batch_item_id=1), (*USER, "batch_item_id"), "string_type"),
        (message(group_id=1), (*USER, "group_id"), "string_type"),
        (
            message(content=[{"text": "no type"}]),
            (*USER, "content", "parts", 0),
            "union_tag_not_found",
        ),
        (message(content=[{"type": "video"}]), (*USER, "content", "parts", 0), "union_tag_invalid"),
        (
            message(content=[{"type": "text"}]),
            (*USER, "content", "parts", 0, "text", "text"),
            "missing",
        ),
        (message(content=None), (*USER, "content"), "string_or_list_type"),
        (
            message(content=[{"type": "tool_call", "id": "c", "name": "n", "input": []}]),
            (*USER, "content", "parts", 0, "tool_call", "input"),
            "dict_type",
        ),
        (
            message(content=[{"type": "tool_return", "tool_call_id": "c", "content": "x"}]),
            (*USER, "content", "parts", 0, "tool_return", "is_error"),
            "missing",
        ),
        (
            message(content=[{"type": "reasoning", "reasoning": "r", "is_native": "sometimes"}]),
            (*USER, "content", "parts", 0, "reasoning", "is_native"),
            "bool_parsing",
        ),
        (
            message(content=[{"type": "redacted_reasoning"}]),
            (*USER, "content", "parts", 0, "redacted_reasoning", "data"),
            "missing",
        ),
        (
            message(content=[{"type": "omitted_reasoning", "signature": 1}]),
            (*USER, "content", "parts", 0, "omitted_reasoning", "signature"),
            "string_type",
        ),
        (
            {"input": [{**SUMMARIZED, "summary": [{"index": "first", "text": "t"}]}]},
            (*PARTS_LOC, 0, "summarized_reasoning", "summary", 0, "index"),
            "int_parsing",
        ),
        (
            {"input": [{**SUMMARIZED, "encrypted_content": None}]},
            (*PARTS_LOC, 0, "summarized_reasoning", "encrypted_content"),
            "string_type",
        ),
        (
            {"input": [{"type": "image", "source": {"type": "ftp", "url": "x"}}]},
            (*PARTS_LOC, 0, "image", "source"),
            "union_tag_invalid",
        ),
        (
            {"input": [{"type": "image", "source": {"url": "https://example.com/a.png"}}]},
            (*PARTS_LOC, 0, "image", "source"),
            "union_tag_not_found",
        ),
        (
            {"input": [{"type": "image", "source": {"type": "base64", "data": "x"}}]},
            (*PARTS_LOC, 0, "image", "source", "base64", "media_type"),
            "missing",
        ),
        (
            {"input": [{"type": "image", "source": {"type": "letta"}}]},
            (*PARTS_LOC, 0, "image", "source", "letta", "file_id"),
            "missing",
        ),
        (
            {"input": [{"type": "image", "source": {"type": "url"}}]},
            (*PARTS_LOC, 0, "image", "source", "url", "url"),
            "missing",
        ),
        (
            approval({"type": "approval", "tool_call_id": "c"}),
            (*APPROVAL, "approvals", 0, "approval", "approve"),
            "missing",
        ),
        (approval({"type": "vote"}), (*APPROVAL, "approvals", 0), "union_tag_invalid"),
        (
            approval({"tool_call_id": "c", "approve": True}),
            (*APPROVAL, "approvals", 0),
            "union_tag_not_found",
        ),
        (
            {"messages": [{"type": "approval", "approve": "perhaps"}]},
            (*APPROVAL, "approve"),
            "bool_parsing",
        ),
        ({"messages": [{"type": "tool_return"}]}, (*MSG, "tool_return", "tool_returns"), "missing"),
        (tool_return(status="ok"), (*TOOL_RETURNS, "status"), "literal_error"),
        (tool_return(type="approval"), (*TOOL_RETURNS, "type"), "literal_error"),
        (tool_return(stdout="printed"), (*TOOL_RETURNS, "stdout"), "list_type"),
        (tool_return(stderr=[1]), (*TOOL_RETURNS, "stderr", 0), "string_type"),
        (tool_return(tool_return=5), (*TOOL_RETURNS, "tool_return"), "string_or_list_type"),
        (
            tool_return(tool_return=[{"type": "reasoning", "reasoning": "r", "is_native": True}]),
            (*TOOL_RETURNS, "tool_return", "parts", 0),
            "union_tag_invalid",
        ),
    ],
)
def test_nested_constraints(body, loc, error_type):
    assert error_at(body, loc)["type"] == error_type


def test_untyped_tool_return_message_is_refused_like_letta():
    # Letta infers only "message" or "approval" for an untyped message.
    body = {
        "messages": [
            {"tool_returns": [{"status": "success", "tool_call_id": "c", "tool_return": ""}]}
        ]
    }
    assert {e["loc"] for e in errors(body)} == {(*USER, "role"), (*USER, "content")}


# --- input and messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Must specify either 'input' or 'messages'."),
        ({"input": None, "messages": None}, "Must specify either 'input' or 'messages'."),
        ({"callback_url": "http://x/cb"}, "Must specify either 'input' or 'messages'."),
        (
            {"input": "x", "messages": [{"role": "user", "content": "y"}]},
            "Cannot specify both 'input' and 'messages'. Use one or the other.",
        ),
    ],
)
def test_exactly_one_of_input_and_messages(body, message):
    error = error_at(body, ())
    assert error["type"] == "value_error"
    assert error["msg"] == f"Value error, {message}"  # word for word what Letta answers


def test_unknown_top_level_fields_are_kept():
    request = AsyncMessageRequest.model_validate(minimal(streaming=True, future={"a": [1]}))
    assert request.model_extra == {"streaming": True, "future": {"a": [1]}}


def test_unknown_nested_fields_are_accepted_as_letta_ignores_them():
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}], "extra": 2},
            {"type": "approval", "approvals": [{**TOOL_RETURN, "meta": {}}], "note": "n"},
        ],
        "client_tools": [{"name": "t", "strict": True}],
    }
    request = AsyncMessageRequest.model_validate(body)
    assert request.messages[0].model_extra == {"extra": 2}
    assert request.messages[0].content[0].model_extra == {"cache": 1}
    assert request.client_tools[0].model_extra == {"strict": True}


def test_validation_never_mutates_the_body():
    body = copy.deepcopy(FULL_BODY)
    AsyncMessageRequest.model_validate(body)
    untyped = {"messages": [{"role": "user", "content": "x"}, {"approve": True}]}
    AsyncMessageRequest.model_validate(untyped)
    assert body == FULL_BODY
    assert untyped == {"messages": [{"role": "user", "content": "x"}, {"approve": True}]}


# --- helpers ---------------------------------------------------------------------------------


def test_message_otids():
    assert message_otids(FULL_BODY) == [OTID, "otid-approval", "otid-tool-return"]
    assert message_otids({"input": "hi"}) == []
    assert message_otids({"messages": [{"otid": None}, "junk", {"otid": 3}]}) == []


def test_ensure_otids_adds_missing_keeps_existing_and_copies():
    body = {
        "messages": [
            {"role": "user", "content": "a", "otid": "keep-me"},
            {"role": "user", "content": "b"},
            {"role": "user", "content": "c", "otid": None},
        ],
        "max_steps": 3,
    }
    before = copy.deepcopy(body)
    result = ensure_otids(body)
    assert body == before  # the input is left alone
    assert result is not body and result["messages"] is not body["messages"]
    otids = [m["otid"] for m in result["messages"]]
    assert otids[0] == "keep-me"
    assert all(uuid.UUID(o).version == 4 for o in otids[1:]) and otids[1] != otids[2]
    assert {k: v for k, v in result.items() if k != "messages"} == {"max_steps": 3}
    assert [{k: v for k, v in m.items() if k != "otid"} for m in result["messages"]] == [
        {"role": "user", "content": c} for c in "abc"
    ]
    assert message_otids(result) == otids
    AsyncMessageRequest.model_validate(result)


def test_ensure_otids_gives_every_message_kind_an_otid():
    body = {k: v for k, v in FULL_BODY.items()}
    body["messages"] = [{k: v for k, v in m.items() if k != "otid"} for m in MESSAGES]
    assert len(set(message_otids(ensure_otids(body)))) == len(MESSAGES)


def test_ensure_otids_leaves_an_input_body_as_is():
    body = {"input": "hi"}
    assert ensure_otids(body) is body and body == {"input": "hi"}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"type": "approval", "approvals": [TOOL_RETURN]}], True),
        ([{"approve": False, "approval_request_id": "message-1", "reason": "no"}], True),
        ([{"type": "tool_return", "tool_returns": [TOOL_RETURN]}], True),
        ([{"role": "user", "content": "hi"}], False),
        ([{"type": "message", "role": "user", "content": "hi"}], False),
        # Letta reads the first message only
        ([{"role": "user", "content": "hi"}, {"type": "approval", "approvals": [TOOL_RETURN]}],
         False),
        ([], False),
    ],
)
def test_answers_pause(messages, expected):
    assert answers_pause({"messages": messages}) is expected


def test_answers_pause_is_false_for_input():
    assert answers_pause({"input": "approve"}) is False


# --- constants -------------------------------------------------------------------------------


def test_id_patterns():
    assert re.match(AGENT_ID_PATTERN, "agent-5ba2cc7c-8cbf-4f37-8066-eda14a61a538")
    assert re.match(RUN_ID_PATTERN, "run-c09eef08-be8a-46c7-b84c-2125f68773dc")
    assert re.match(RUN_ID_PATTERN, f"run-{uuid.uuid4()}")
    for bad in ["agent-123", "agent-5BA2CC7C-8cbf-4f37-8066-eda14a61a538", f"run-{uuid.uuid4()}"]:
        assert not re.match(AGENT_ID_PATTERN, bad)
    assert not re.match(RUN_ID_PATTERN, "run-123e4567-e89b-12d3-a456-426614174000")  # not v4
    assert not re.match(RUN_ID_PATTERN, f"agent-{uuid.uuid4()}")


def test_message_types():
    assert len(MESSAGE_TYPES) == len(set(MESSAGE_TYPES)) == 11
    assert {"summary_message", "event_message", "approval_response_message"} <= set(MESSAGE_TYPES)


# --- the JSON Schema -------------------------------------------------------------------------

SCHEMA = AsyncMessageRequest.model_json_schema()


def walk(node: Any):
    """Every dict inside a JSON value."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_schema_is_self_contained_json():
    assert json.loads(json.dumps(SCHEMA)) == SCHEMA
    refs = {n["$ref"] for n in walk(SCHEMA) if "$ref" in n} | {
        target
        for n in walk(SCHEMA)
        for target in n.get("discriminator", {}).get("mapping", {}).values()
    }
    assert refs and all(r.startswith("#/$defs/") for r in refs)
    assert {r.removeprefix("#/$defs/") for r in refs} <= set(SCHEMA["$defs"])


def test_schema_unions_say_what_validation_does():
    items = SCHEMA["properties"]["messages"]["anyOf"][0]["items"]
    assert [ref["$ref"].split("/")[-1] for ref in items["anyOf"]] == [
        "MessageCreate",
        "ApprovalCreate",
        "ToolReturnCreate",
    ]
    tagged = ["TextContent", "ImageContent", "UrlImage", "SummarizedReasoningContent"]
    assert all("type" in SCHEMA["$defs"][name]["required"] for name in tagged)
    assert "type" not in SCHEMA["$defs"]["ToolReturn"].get("required", [])


def test_every_schema_property_has_a_description():
    models = [SCHEMA, *SCHEMA["$defs"].values()]
    missing = [
        f"{m['title']}.{name}"
        for m in models
        for name, prop in m["properties"].items()
        if not prop.get("description")
    ]
    assert missing == []
    assert all(m.get("description") for m in models)
    deprecated = {k for k, v in SCHEMA["properties"].items() if v.get("deprecated")}
    assert deprecated == {
        "use_assistant_message",
        "assistant_message_tool_name",
        "assistant_message_tool_kwarg",
        "enable_thinking",
    }


def test_schema_is_valid_and_accepts_the_bodies_the_model_accepts():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    input_body = {"input": [*CONTENT_PARTS, SUMMARIZED], "future_field": 1}
    for body in [
        FULL_BODY,
        input_body,
        {"input": "hi"},
        {"messages": [{"role": "user", "content": "x"}]},
    ]:
        assert list(validator.iter_errors(body)) == []
    assert list(validator.iter_errors(minimal(top_logprobs="many")))


# --- arbitrary input never breaks validation -------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Bodies built from the schema's own field names and tags reach deep into the nested models.
KNOWN_KEYS = sorted({name for n in walk(SCHEMA) for name in n.get("properties", {})})
TAGS = sorted({n["const"] for n in walk(SCHEMA) if isinstance(n.get("const"), str)} | {"x"})
SHAPED_VALUES = st.recursive(
    JSON_SCALARS | st.sampled_from(TAGS),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=40,
)


def slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) inside a JSON value."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    return [(node, key) for key, _ in items] + [s for _, child in items for s in slots(child)]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with a few values anywhere in it replaced or removed."""
    input_body = {k: v for k, v in FULL_BODY.items() if k != "messages"} | {"input": CONTENT_PARTS}
    body = copy.deepcopy(draw(st.sampled_from([FULL_BODY, input_body])))
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(slots(body)))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(SHAPED_VALUES)
    return body


def check_only_validation_errors(value: Any) -> None:
    with contextlib.suppress(ValidationError):
        AsyncMessageRequest.model_validate(value)
    if isinstance(value, dict):  # the helpers must not raise on any JSON object either
        message_otids(value)
        answers_pause(value)
        ensure_otids(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_arbitrary_json_only_ever_raises_validation_error(value):
    check_only_validation_errors(value)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KNOWN_KEYS), SHAPED_VALUES, max_size=6))
def test_shaped_json_only_ever_raises_validation_error(value):
    check_only_validation_errors(value)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_bodies())
def test_mutated_valid_bodies_only_ever_raise_validation_error(value):
    check_only_validation_errors(value)
