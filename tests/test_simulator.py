"""The Letta simulator against the real server's recorded samples, and its fault injection."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import eventually
from tests.samples import assert_same_shape, body, load
from tracker.sim_cli import faults_from_args
from tracker.simulator import Faults, Simulator, add_arguments

FAST = Faults(run_duration_s=(0.03, 0.06), callback_lag_s=0.05)
UNKNOWN_AGENT = "agent-00000000-0000-4000-8000-000000000000"
UNKNOWN_RUN = "run-00000000-0000-4000-8000-000000000000"


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=1, faults=FAST)


@pytest.fixture
async def client(aiohttp_client, sim):
    return await aiohttp_client(sim.app())


@pytest.fixture
def agent(sim) -> str:
    return sim.create_agent("test")["id"]


class Receiver:
    """A callback receiver: `/cb`, `/cb/status/{code}` and `/cb/sleep/{seconds}`."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.server: Any = None

    def url(self, path: str = "/cb") -> str:
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.calls.append(
            {"path": request.path, "headers": request.headers, "raw": raw, "json": json.loads(raw)}
        )
        if "sleep" in request.match_info:
            await asyncio.sleep(float(request.match_info["sleep"]))
        return web.Response(status=int(request.match_info.get("status", 200)))


@pytest.fixture
async def receiver(aiohttp_server) -> Receiver:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/cb", rec.handle)
    app.router.add_post("/cb/status/{status}", rec.handle)
    app.router.add_post("/cb/sleep/{sleep}", rec.handle)
    rec.server = await aiohttp_server(app)
    return rec


def until(check, timeout: float = 3.0, every: float = 0.01):
    """Await `check()` (sync or async) until truthy."""
    return eventually(check, timeout, every)


async def submit(client, agent_id: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    response = await client.post(
        f"/v1/agents/{agent_id}/messages/async",
        json={"messages": [{"role": "user", "content": text}], **extra},
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def get_json(client, path: str, status: int = 200, **params: Any) -> Any:
    response = await client.get(path, params=params or None)
    assert response.status == status, await response.text()
    return await response.json()


async def run_when(client, run_id: str, check) -> dict[str, Any]:
    async def poll():
        run = await get_json(client, f"/v1/runs/{run_id}")
        return run if check(run) else None

    return await until(poll)


def terminal(run: dict[str, Any]) -> bool:
    return run["status"] in ("completed", "failed", "cancelled")


def called_back(run: dict[str, Any]) -> bool:
    return run["callback_sent_at"] is not None


def naive(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.removesuffix("Z"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- health and agents ---------------------------------------------------------------------


async def test_health_matches_sample(client):
    response = await client.get("/v1/health/")
    assert (response.status, await response.json()) == (200, body("health"))
    for header in ("content-type", "server"):
        assert response.headers[header] == load("health")["headers"][header]
    assert (await get_json(client, "/v1/health")) == body("health")


async def test_agent_create_and_get_keep_letta_keys(client):
    response = await client.post("/v1/agents/", json=load("agent_create")["request"]["body"])
    created = await response.json()
    assert response.status == 200
    assert list(created) == list(body("agent_create"))
    assert created["name"] == "probe-441386" and created["id"].startswith("agent-")
    assert created["created_at"].endswith("Z")
    assert (await get_json(client, f"/v1/agents/{created['id']}")) == created


async def test_agent_id_errors_match_samples(client):
    for name in ("get_agent_malformed", "get_agent_nonexistent"):
        sample = load(name)
        response = await client.get("/v1/" + sample["request"]["url"].split("/v1/", 1)[1])
        assert (response.status, await response.json()) == (sample["status"], sample["body"])
    response = await client.get("/v1/no-such-route")
    assert (response.status, await response.json()) == (404, {"detail": "Not Found"})


# -- submitting ----------------------------------------------------------------------------


async def test_post_response_and_run_before_match_samples(client, agent, receiver):
    run = await submit(client, agent, callback_url=receiver.url())
    assert_same_shape(run, body("async_basic__post_response"))
    assert run["status"] == "created" and run["callback_url"] == receiver.url()
    assert run["request_config"] == body("async_basic__post_response")["request_config"]
    before = await get_json(client, f"/v1/runs/{run['id']}")
    assert_same_shape(before, body("async_basic__run_before"))
    assert before == run


async def test_finished_run_callback_messages_usage_match_samples(client, agent, receiver):
    run = await submit(client, agent, "hi there", callback_url=receiver.url())
    after = await run_when(client, run["id"], called_back)
    assert_same_shape(after, body("async_basic__run_after"))
    assert (after["status"], after["stop_reason"], after["callback_status_code"]) == (
        "completed", "end_turn", 200)
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    assert_same_shape(call["json"], body("async_basic__callback"))
    assert call["json"]["metadata"]["result"]["stop_reason"]["stop_reason"] == "end_turn"
    recorded = dict(load("async_basic__callback")["headers"])
    for header in ("User-Agent", "Content-Type", "Accept", "Accept-Encoding"):
        assert call["headers"][header] == recorded[header]
    # httpx sends compact JSON
    assert call["raw"].startswith(b'{"run_id":"')
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert_same_shape(messages, body("async_basic__run_messages"))
    assert [m["content"] for m in messages] == ["hi there", "Hello from fake LLM."]
    assert messages == call["json"]["metadata"]["result"]["messages"]
    # the server-assigned user otid; the reply's otid is its id with the low 7 bits cleared
    assert messages[1]["otid"][:-2] == messages[1]["id"].removeprefix("message-")[:-2]
    usage = await get_json(client, f"/v1/runs/{run['id']}/usage")
    assert_same_shape(usage, body("async_basic__run_usage"))
    steps = await get_json(client, f"/v1/runs/{run['id']}/steps")
    assert_same_shape(steps, body("async_basic__run_steps"))
    assert [(s["status"], s["stop_reason"]) for s in steps] == [("success", "end_turn")]


async def test_a_cancelled_runs_step_is_pending_until_its_turn_ends(client, agent):
    """Letta's cancel does not stop the step: it stays `pending` until the turn ends."""
    run = await submit(client, agent, "[[delay=0.3]] slow")
    await client.post(f"/v1/agents/{agent}/messages/cancel", json={"run_ids": [run["id"]]})
    [step] = await get_json(client, f"/v1/runs/{run['id']}/steps?limit=1")
    cancelled = await get_json(client, f"/v1/runs/{run['id']}")
    assert (cancelled["status"], step["status"]) == ("cancelled", "pending")
    await asyncio.sleep(0.45)
    [step] = await get_json(client, f"/v1/runs/{run['id']}/steps")
    after = await get_json(client, f"/v1/runs/{run['id']}")
    assert (after["status"], step["status"]) == ("completed", "success")


async def test_an_answer_run_lists_no_step_and_no_message_until_its_step_ends(client, agent,
                                                                              sim):
    """Letta runs an answer's first step under the paused run's step id, logging no step of
    its own (letta_agent_v3.py, the approval branch), and stores its messages at that step's
    end."""
    paused = await submit(client, agent, "[[approval]] please")
    await run_when(client, paused["id"], terminal)
    call_id = (await approval_request(client, paused["id"]))["tool_call"]["tool_call_id"]
    sim.set_faults(run_duration_s=(0.3, 0.3))
    answer = await submit_approval(client, agent, call_id)
    assert await get_json(client, f"/v1/runs/{answer['id']}/steps") == []
    assert await get_json(client, f"/v1/runs/{answer['id']}/messages") == []
    await run_when(client, answer["id"], terminal)
    assert await get_json(client, f"/v1/runs/{answer['id']}/steps") == []
    assert await get_json(client, f"/v1/runs/{answer['id']}/messages") != []


async def test_run_is_terminal_before_its_callback(client, agent, receiver, sim):
    sim.set_faults(callback_lag_s=0.3)
    run = await submit(client, agent, callback_url=receiver.url())
    done = await run_when(client, run["id"], terminal)
    assert done["callback_sent_at"] is None and receiver.calls == []
    after = await run_when(client, run["id"], called_back)
    lag = naive(after["callback_sent_at"]) - naive(after["completed_at"])
    assert lag.total_seconds() >= 0.3
    sent = naive(receiver.calls[0]["json"]["completed_at"])
    assert sent >= naive(after["completed_at"])


async def test_input_sugar_and_client_otid(client, agent, sim):
    sugar_body = {"input": "sugar", "callback_url": "http://127.0.0.1:9/cb"}
    response = await client.post(f"/v1/agents/{agent}/messages/async", json=sugar_body)
    sugar = await response.json()
    assert_same_shape(sugar, body("input_sugar__post_response"))
    otid = "11111111-2222-4333-8444-555555555555"
    given = await submit(client, agent, messages=[
        {"role": "user", "content": [{"type": "text", "text": "parts"}], "otid": otid}])
    for run_id in (sugar["id"], given["id"]):
        await run_when(client, run_id, terminal)
    first = (await get_json(client, f"/v1/runs/{sugar['id']}/messages"))[0]
    assert first["content"] == "sugar" and first["otid"]
    second = (await get_json(client, f"/v1/runs/{given['id']}/messages"))[0]
    assert second["otid"] == otid and second["content"][0]["text"] == "parts"
    assert sim.otid_counts()[otid] == 1


async def test_body_errors_match_samples(client, agent, sim):
    path = f"/v1/agents/{agent}/messages/async"
    sample = load("neither_input_nor_messages__post_response")
    response = await client.post(path, json=sample["request"]["body"])
    assert (response.status, await response.json()) == (422, sample["body"])
    response = await client.post(path, json=load("input_and_messages_both__post_response")[
        "request"]["body"])
    both = await response.json()
    assert response.status == 422 and list(both) == ["trace_id", "detail"]
    assert "Cannot specify both 'input' and 'messages'" in both["detail"]
    response = await client.post(path, data=b"{not json", headers={"Content-Type": "text/plain"})
    broken = await response.json()
    assert response.status == 422 and broken["detail"].startswith("[{'type': 'json_invalid'")
    assert sim.received == []


async def test_agent_errors_on_post_match_samples(client, sim):
    for name in ("malformed_agent_id__post", "malformed_agent_id_prefix_ok__post",
                 "nonexistent_agent_id__post"):
        sample = load(name)
        path = "/v1/" + sample["request"]["url"].split("/v1/", 1)[1]
        response = await client.post(path, json=sample["request"]["body"])
        assert (response.status, await response.json()) == (sample["status"], sample["body"])
    assert sim.received == [] and list(sim.store.runs()) == []


async def test_concurrent_runs_on_one_agent_run_in_parallel(client, agent):
    runs = [await submit(client, agent, f"[[delay=0.3]] #{i}") for i in range(3)]
    await asyncio.sleep(0.45)  # serialised, the three would need 0.9 s
    for run in runs:
        assert (await get_json(client, f"/v1/runs/{run['id']}"))["status"] == "completed"


# -- how runs end --------------------------------------------------------------------------


async def test_failed_run_matches_llm_error_samples(client, agent, receiver):
    run = await submit(client, agent, "[[fail]] boom", callback_url=receiver.url())
    after = await run_when(client, run["id"], called_back)
    assert_same_shape(after, body("llm_error_500__run_after"))
    assert after["metadata"] == body("llm_error_500__run_after")["metadata"]
    assert (after["status"], after["stop_reason"]) == ("failed", "error")
    assert_same_shape(receiver.calls[0]["json"], body("llm_error_500__callback"))
    assert (await get_json(client, f"/v1/runs/{run['id']}/messages")) == []
    usage = await get_json(client, f"/v1/runs/{run['id']}/usage")
    assert usage == body("llm_error_500__run_usage")


async def test_fail_markers_choose_the_llm_error(client, agent):
    for status in (429, 400):
        run = await submit(client, agent, f"[[fail={status}]]")
        after = await run_when(client, run["id"], terminal)
        assert after["metadata"] == body(f"llm_error_{status}__run_after")["metadata"]


async def test_approval_marker_pauses_the_run(client, agent):
    run = await submit(client, agent, "[[approval]] please")
    after = await run_when(client, run["id"], terminal)
    assert (after["status"], after["stop_reason"]) == ("completed", "requires_approval")
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert [m["message_type"] for m in messages] == ["user_message", "approval_request_message"]


async def submit_approval(client, agent_id: str, call_id: str = "call-1",
                          **answer: Any) -> dict[str, Any]:
    message = answer or {"approvals": [{"type": "approval", "approve": True,
                                        "tool_call_id": call_id}]}
    response = await client.post(f"/v1/agents/{agent_id}/messages/async", json={"messages": [
        {"type": "approval", **message}]})
    assert response.status == 200, await response.text()
    return await response.json()


async def approval_request(client, run_id: str) -> dict[str, Any]:
    """The approval request a paused run ends with."""
    return (await get_json(client, f"/v1/runs/{run_id}/messages"))[-1]


async def test_a_paused_agent_refuses_messages_until_approved_as_letta_does(client, agent):
    """Letta fails a message sent while its agent awaits an approval (PendingApprovalError),
    and an approval sent when none is awaited; the approval itself goes through."""
    early = await submit_approval(client, agent)
    failed = await run_when(client, early["id"], terminal)
    assert (failed["status"], failed["stop_reason"]) == ("failed", "error")
    assert failed["metadata"]["error"].startswith("Cannot process approval response")
    paused = await submit(client, agent, "[[approval]] please")
    await run_when(client, paused["id"], terminal)
    refused = await run_when(client, (await submit(client, agent, "next"))["id"], terminal)
    assert (refused["status"], refused["stop_reason"]) == ("failed", "error")
    assert refused["metadata"]["error"].startswith("CONFLICT: Cannot send a new message")
    assert await get_json(client, f"/v1/runs/{refused['id']}/messages") == []
    call_id = (await approval_request(client, paused["id"]))["tool_call"]["tool_call_id"]
    answer = await run_when(client, (await submit_approval(client, agent, call_id))["id"],
                            terminal)
    assert (answer["status"], answer["stop_reason"]) == ("completed", "end_turn")
    after = await run_when(client, (await submit(client, agent, "next"))["id"], terminal)
    assert (after["status"], after["stop_reason"]) == ("completed", "end_turn")


async def test_an_approval_of_other_tool_calls_is_refused_and_the_agent_waits_on(client, agent):
    """Letta checks an approval's tool call ids against those its agent asked about
    (validate_approval_tool_call_ids): others fail the run, in its words, and the agent still
    awaits the approval; the request's message id stands for its one call (the old form)."""
    paused = await submit(client, agent, "[[approval]] please")
    await run_when(client, paused["id"], terminal)
    request = await approval_request(client, paused["id"])
    call_id = request["tool_call"]["tool_call_id"]
    for wrong, words in (({"approvals": [{"type": "approval", "approve": True,
                                          "tool_call_id": "call-other"}]},
                          f"Invalid tool call IDs. Expected '{[call_id]}', but received"
                          " '['call-other']'."),
                         ({"approvals": []}, "Invalid approval response.")):
        failed = await run_when(client, (await submit_approval(client, agent, **wrong))["id"],
                                terminal)
        assert (failed["status"], failed["stop_reason"]) == ("failed", "error")
        assert failed["metadata"]["error"].startswith(words)
    still = await run_when(client, (await submit(client, agent, "next"))["id"], terminal)
    assert still["metadata"]["error"].startswith("CONFLICT: Cannot send a new message")
    old_form = {"approve": True, "approval_request_id": request["id"]}
    answer = await run_when(client, (await submit_approval(client, agent, **old_form))["id"],
                            terminal)
    assert (answer["status"], answer["stop_reason"]) == ("completed", "end_turn")


async def paused_call(client, agent_id: str) -> tuple[dict[str, Any], str]:
    """Pause the agent for an approval: the paused run and its tool call id."""
    paused = await submit(client, agent_id, "[[approval]] please")
    await run_when(client, paused["id"], terminal)
    request = await approval_request(client, paused["id"])
    return paused, request["tool_call"]["tool_call_id"]


async def test_an_untyped_message_with_approval_fields_answers_the_pause(client, agent):
    """Letta types a message sent without `type` but with `approve` or
    `approval_request_id` as an approval (schemas/letta_request.py,
    add_default_type_to_messages), its deprecated fields made one approval
    (schemas/message.py, ApprovalCreate.migrate_deprecated_fields)."""
    _, call_id = await paused_call(client, agent)
    # `approve` missing: an approval still, but with no approvals in it
    response = await client.post(f"/v1/agents/{agent}/messages/async", json={"messages": [
        {"approval_request_id": call_id}]})
    failed = await run_when(client, (await response.json())["id"], terminal)
    assert failed["metadata"]["error"].startswith("Invalid approval response.")
    response = await client.post(f"/v1/agents/{agent}/messages/async", json={"messages": [
        {"approve": False, "approval_request_id": call_id, "reason": "no"}]})
    answer = await run_when(client, (await response.json())["id"], terminal)
    assert (answer["status"], answer["stop_reason"]) == ("completed", "end_turn")
    stored = (await get_json(client, f"/v1/runs/{answer['id']}/messages"))[0]
    assert stored["message_type"] == "approval_response_message"
    assert stored["approvals"] == [{"type": "approval", "tool_call_id": call_id,
                                    "approve": False, "reason": "no"}]
    after = await run_when(client, (await submit(client, agent, "next"))["id"], terminal)
    assert (after["status"], after["stop_reason"]) == ("completed", "end_turn")


async def test_a_message_typed_null_is_a_plain_message(client, agent):
    """`"type": null` is an ordinary message to Letta: MessageCreate.type is Optional, the
    approval types are not (schemas/message.py)."""
    response = await client.post(f"/v1/agents/{agent}/messages/async", json={"messages": [
        {"type": None, "role": "user", "content": "hi"}]})
    run = await run_when(client, (await response.json())["id"], terminal)
    assert (run["status"], run["stop_reason"]) == ("completed", "end_turn")
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert (messages[0]["message_type"], messages[0]["content"]) == ("user_message", "hi")


async def test_an_approval_response_is_stored_without_otid_and_from_its_first_approval(
        client, agent):
    """Letta stores an approval answer as a new Message without the request's otid
    (server/rest_api/utils.py, create_approval_response_message_from_input), and lists it
    with approve / approval_request_id / reason taken from its first approval, tool returns
    not counting (schemas/message.py, Message.to_letta_messages)."""
    _, call_id = await paused_call(client, agent)
    approval = {"type": "approval", "tool_call_id": call_id, "approve": True, "reason": "ok"}
    answer = await submit_approval(client, agent, otid="client-otid-1", approvals=[approval])
    await run_when(client, answer["id"], terminal)
    stored = (await get_json(client, f"/v1/runs/{answer['id']}/messages"))[0]
    assert stored["otid"] is None
    assert (stored["approve"], stored["approval_request_id"], stored["reason"]) == (
        True, call_id, "ok")
    assert stored["approvals"] == [approval]
    _, call_id = await paused_call(client, agent)
    response = await client.post(f"/v1/agents/{agent}/messages/async", json={"messages": [
        {"type": "tool_return", "otid": "client-otid-2", "tool_returns": [
            {"tool_call_id": call_id, "status": "success", "tool_return": "42"}]}]})
    await run_when(client, (await response.json())["id"], terminal)
    stored = (await get_json(client, f"/v1/runs/{(await response.json())['id']}/messages"))[0]
    assert (stored["otid"], stored["approve"], stored["approval_request_id"]) == (
        None, None, None)
    assert stored["approvals"] == [{"type": "tool", "tool_return": "42", "status": "success",
                                    "tool_call_id": call_id, "stdout": None, "stderr": None}]


async def test_cancelling_a_paused_run_cancels_it_and_ends_the_wait(client, agent, receiver):
    """Letta cancels a run paused for an approval (denying its tool calls), with no
    callback (the run had completed), and its agent takes messages again."""
    paused = await submit(client, agent, "[[approval]] please", callback_url=receiver.url())
    await run_when(client, paused["id"], called_back)
    response = await client.post(f"/v1/agents/{agent}/messages/cancel",
                                 json={"run_ids": [paused["id"]]})
    assert await response.json() == {paused["id"]: "cancelled"}
    run = await get_json(client, f"/v1/runs/{paused['id']}")
    assert (run["status"], run["stop_reason"]) == ("cancelled", "cancelled")
    after = await run_when(client, (await submit(client, agent, "next"))["id"], terminal)
    assert (after["status"], after["stop_reason"]) == ("completed", "end_turn")
    await asyncio.sleep(0.1)
    assert len(receiver.calls) == 1  # the pause's own callback only


async def test_delay_marker_sets_the_duration(client, agent):
    run = await submit(client, agent, "[[delay=0.3]] slow")
    await asyncio.sleep(0.15)
    assert (await get_json(client, f"/v1/runs/{run['id']}"))["status"] == "created"
    await run_when(client, run["id"], terminal)


async def test_legacy_agent_answers_with_reasoning(client, sim):
    agent = sim.create_agent("legacy", agent_type="memgpt_v2_agent")["id"]
    run = await submit(client, agent, "legacy")
    await run_when(client, run["id"], terminal)
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert_same_shape(messages, body("legacy_memgpt_v2_async__run_messages"))
    assert messages[1]["id"] == messages[2]["id"]
    assert (messages[1]["otid"][-2:], messages[2]["otid"][-2:]) in (("00", "01"), ("80", "81"))


async def test_include_return_message_types_filters_results(client, agent, receiver):
    run = await submit(client, agent, callback_url=receiver.url(),
                       include_return_message_types=["assistant_message"])
    assert run["request_config"]["include_return_message_types"] == ["assistant_message"]
    await run_when(client, run["id"], called_back)
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert [m["message_type"] for m in messages] == ["assistant_message"]
    assert receiver.calls[0]["json"]["metadata"]["result"]["messages"] == messages


# -- reading runs --------------------------------------------------------------------------


async def test_run_id_errors_match_samples(client):
    response = await client.get("/v1/runs/not-a-run-id")
    assert (response.status, await response.json()) == (400, body("get_run_malformed"))
    for name, suffix in (("get_run_nonexistent", ""), ("get_run_messages_nonexistent",
                         "/messages"), ("get_run_usage_nonexistent", "/usage")):
        response = await client.get(f"/v1/runs/{UNKNOWN_RUN}{suffix}")
        got, want = await response.json(), body(name)["detail"]
        assert response.status == 404
        prefix = want.split("created_at=")[0]
        assert got["detail"].startswith(prefix) and got["detail"].endswith("is_deleted=False'")


async def test_runs_list_filters(client, agent, sim, receiver):
    other = sim.create_agent("other")["id"]
    ok = await submit(client, agent, "fine", callback_url=receiver.url())
    failed = await submit(client, agent, "[[fail]]")
    endless = await submit(client, agent, "[[never]]")
    await submit(client, other, "elsewhere")
    await run_when(client, failed["id"], terminal)
    await run_when(client, ok["id"], called_back)

    async def ids(**params: Any) -> list[str]:
        return [r["id"] for r in await get_json(client, "/v1/runs/", **params)]

    listed = await get_json(client, "/v1/runs", agent_id=agent)
    assert [r["id"] for r in listed] == [endless["id"], failed["id"], ok["id"]]
    assert_same_shape(listed[2], body("runs_list_by_agent")[0])
    assert listed[0]["total_duration_ns"] is None and listed[1]["total_duration_ns"] > 0
    assert await ids(agent_id=agent, limit=1) == [endless["id"]]
    assert await ids(agent_id=agent, statuses="completed") == [ok["id"]]
    repeated = [("agent_id", agent), ("statuses", "completed"), ("statuses", "failed")]
    response = await client.get("/v1/runs/", params=repeated)
    assert [r["id"] for r in await response.json()] == [failed["id"], ok["id"]]
    assert await ids(agent_id=agent, active="true") == [endless["id"]]
    assert await ids(agent_id=agent, stop_reason="error") == [failed["id"]]
    assert await ids(agent_id=agent, background="false") == []
    assert await ids(agent_id=agent, conversation_id="conv-1") == []
    assert await ids(agent_id=UNKNOWN_AGENT) == []
    assert len(await ids()) == 4


async def test_runs_list_cursors_are_reversed_as_in_letta(client, agent):
    # Letta 0.16.8 (run_manager_helper): `after` filters with forward=not ascending, `before`
    # with forward=ascending, so `before` is the next page in the listing's order and `after`
    # the runs on the cursor's near side: the reverse of their names
    runs = [(await submit(client, agent, f"#{i}"))["id"] for i in range(5)]

    async def ids(**params: Any) -> list[str]:
        return [r["id"] for r in await get_json(client, "/v1/runs/", agent_id=agent, **params)]

    assert await ids() == runs[::-1]
    assert await ids(before=runs[2]) == [runs[1], runs[0]]
    assert await ids(after=runs[2]) == [runs[4], runs[3]]
    assert await ids(after=runs[2], order="asc") == [runs[0], runs[1]]
    assert await ids(before=runs[2], order="asc") == [runs[3], runs[4]]
    assert await ids(before=runs[4], after=runs[0]) == [runs[3], runs[2], runs[1]]
    page = await ids(limit=2)
    assert page + await ids(limit=2, before=page[-1]) == runs[:0:-1]
    assert await ids(before=UNKNOWN_RUN) == runs[::-1]


async def test_runs_list_rejects_bad_parameters(client):
    for params, kind in (({"limit": "0"}, "greater_than_equal"),
                         ({"limit": "1001"}, "less_than_equal"),
                         ({"limit": "x"}, "int_parsing"),
                         ({"order": "sideways"}, "literal_error"),
                         ({"active": "maybe"}, "bool_parsing")):
        response = await client.get("/v1/runs/", params=params)
        got = await response.json()
        assert response.status == 422 and got["trace_id"] == ""
        assert got["detail"].startswith(f"[{{'type': '{kind}', 'loc': ('query', ")


async def test_runs_list_bad_status_is_a_400_after_validation(client, agent):
    """Letta reads `statuses` as plain strings and converts them in the route
    (server/rest_api/routers/v1/runs.py, convert_statuses_to_enum): a bad one is a
    ValueError, which its app answers 400 with the error's words (server/rest_api/app.py);
    FastAPI's 422s for the other parameters come first."""
    response = await client.get("/v1/runs/", params=[("statuses", "completed"),
                                                     ("statuses", "bogus")])
    expected = {"detail": "'bogus' is not a valid RunStatus"}
    assert (response.status, await response.json()) == (400, expected)
    response = await client.get("/v1/runs/", params={"statuses": "bogus", "limit": "0"})
    assert response.status == 422


async def test_runs_list_empty_conversation_id_matches_no_run(client, agent):
    """Letta filters on `conversation_id` whenever it is given, even empty
    (services/run_manager.py, list_runs: `conversation_id is not None`): simulated runs have
    none, so nothing matches."""
    run = await submit(client, agent)
    await run_when(client, run["id"], terminal)
    assert [r["id"] for r in await get_json(client, "/v1/runs/")] == [run["id"]]
    assert await get_json(client, "/v1/runs/", conversation_id="") == []


async def test_run_messages_pagination(client, agent):
    texts = ["one", "two", "three"]
    run = await submit(client, agent, messages=[{"role": "user", "content": t} for t in texts])
    await run_when(client, run["id"], terminal)
    path = f"/v1/runs/{run['id']}/messages"
    messages = await get_json(client, path)
    ids = [m["id"] for m in messages]
    assert [m.get("content") for m in messages] == [*texts, "Hello from fake LLM."]

    async def page(**params: Any) -> list[str]:
        return [m["id"] for m in await get_json(client, path, **params)]

    assert await page(order="desc") == ids[::-1]
    assert await page(limit=2) == ids[:2]
    assert await page(after=ids[0], limit=2) == ids[1:3]
    assert await page(before=ids[3]) == ids[:3]
    # Letta: `after` keeps later messages (sequence_id greater), whatever the order
    assert await page(after=ids[0], order="desc", limit=2) == [ids[3], ids[2]]
    assert await page(before=ids[3], order="desc") == [ids[2], ids[1], ids[0]]
    assert await page(after=ids[0], before=ids[3]) == ids[1:3]


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_mid_turn_is_overwritten_by_the_turn(client, agent, receiver):
    run = await submit(client, agent, "[[delay=0.5]] slow", callback_url=receiver.url())
    await asyncio.sleep(0.1)
    response = await client.post(f"/v1/agents/{agent}/messages/cancel",
                                 json={"run_ids": [run["id"]]})
    assert (response.status, await response.json()) == (200, {run["id"]: "cancelled"})
    # Letta awaits the callback inside the cancel request, so it is already recorded.
    right_after = await get_json(client, f"/v1/runs/{run['id']}")
    assert_same_shape(right_after, body("cancel_during_slow_llm__run_right_after_cancel"))
    assert (right_after["status"], right_after["stop_reason"]) == ("cancelled", "cancelled")
    assert right_after["callback_status_code"] == 200
    assert_same_shape(receiver.calls[0]["json"], body("cancel_during_slow_llm__callback"))
    assert receiver.calls[0]["json"]["status"] == "cancelled"
    final = await run_when(client, run["id"], lambda r: r["status"] == "completed")
    assert_same_shape(final, body("cancel_during_slow_llm__run_final"))
    assert final["stop_reason"] == "end_turn"
    for key in ("completed_at", "callback_sent_at", "callback_status_code"):
        assert final[key] == right_after[key]
    messages = await get_json(client, f"/v1/runs/{run['id']}/messages")
    assert_same_shape(messages, body("cancel_during_slow_llm__run_messages"))
    await asyncio.sleep(0.15)
    assert len(receiver.calls) == 1
    listed = await get_json(client, "/v1/runs/", agent_id=agent)
    assert listed[0]["total_duration_ns"] >= 0.5e9


async def test_cancel_all_active_then_conflict(client, agent):
    slow = [await submit(client, agent, "[[delay=0.4]]") for _ in range(2)]
    response = await client.post(f"/v1/agents/{agent}/messages/cancel", json={})
    assert await response.json() == {r["id"]: "cancelled" for r in slow}
    assert set(body("cancel_all_active__cancel_response").values()) == {"cancelled"}
    response = await client.post(f"/v1/agents/{agent}/messages/cancel")
    expected = {"detail": f"CONFLICT: No active runs to cancel for agent {agent}"}
    assert (response.status, await response.json()) == (409, expected)


async def test_cancel_unknown_and_finished_runs(client, agent, receiver):
    response = await client.post(f"/v1/agents/{agent}/messages/cancel",
                                 json=load("cancel_nonexistent_run")["request"]["body"])
    assert await response.json() == body("cancel_nonexistent_run")
    run = await submit(client, agent, callback_url=receiver.url())
    done = await run_when(client, run["id"], called_back)
    response = await client.post(f"/v1/agents/{agent}/messages/cancel",
                                 json={"run_ids": [run["id"]]})
    assert await response.json() == {run["id"]: "cancelled"}
    assert await get_json(client, f"/v1/runs/{run['id']}") == done
    assert len(receiver.calls) == 1


async def test_cancel_never_looks_up_the_paths_agent(client, agent):
    """Letta's cancel route does not look the path's agent up
    (server/rest_api/routers/v1/agents.py, cancel_message): a named run is cancelled under
    its own agent (services/run_manager.py, cancel_run), and an empty body finds no active
    run of an unknown agent: 409, NoActiveRunsToCancelError."""
    run = await submit(client, agent, "[[delay=2]]")
    response = await client.post(f"/v1/agents/{UNKNOWN_AGENT}/messages/cancel",
                                 json={"run_ids": [run["id"]]})
    assert (response.status, await response.json()) == (200, {run["id"]: "cancelled"})
    cancelled = await get_json(client, f"/v1/runs/{run['id']}")
    assert (cancelled["status"], cancelled["stop_reason"]) == ("cancelled", "cancelled")
    response = await client.post(f"/v1/agents/{UNKNOWN_AGENT}/messages/cancel", json={})
    expected = {"detail": f"CONFLICT: No active runs to cancel for agent {UNKNOWN_AGENT}"}
    assert (response.status, await response.json()) == (409, expected)


# -- callback outcomes ---------------------------------------------------------------------


async def test_receiver_errors_are_recorded_not_retried(client, agent, receiver):
    for status in (500, 404):
        run = await submit(client, agent, callback_url=receiver.url(f"/cb/status/{status}"))
        after = await run_when(client, run["id"], called_back)
        assert_same_shape(after, body(f"callback_receiver_{status}__run_after"))
        assert (after["callback_status_code"], after["callback_error"]) == (status, None)
    await asyncio.sleep(0.1)
    assert len(receiver.calls) == 2


async def test_unreachable_receiver_is_recorded(client, agent):
    url = f"http://127.0.0.1:{closed_port()}/cb"
    run = await submit(client, agent, callback_url=url)
    after = await run_when(client, run["id"], called_back)
    assert_same_shape(after, body("callback_unreachable__run_after"))
    assert after["callback_status_code"] is None
    assert after["callback_error"] == (
        f"Failed to dispatch callback for run {run['id']} to {url}: "
        "ConnectError('All connection attempts failed')")


async def test_slow_receiver_times_out(client, agent, receiver, sim):
    sim.set_faults(callback_timeout_s=0.2)
    url = receiver.url("/cb/sleep/1")
    run = await submit(client, agent, callback_url=url)
    after = await run_when(client, run["id"], called_back)
    assert_same_shape(after, body("callback_receiver_slow_7s__run_after"))
    assert after["callback_status_code"] is None
    assert after["callback_error"] == (
        f"Failed to dispatch callback for run {run['id']} to {url}: ReadTimeout('')")


async def test_callback_url_that_is_not_a_url(client, agent):
    run = await submit(client, agent, callback_url="not-a-url")
    after = await run_when(client, run["id"], called_back)
    sample = body("callback_url_not_a_url__run_after")
    assert after["callback_error"] == sample["callback_error"].replace(sample["id"], run["id"])
    assert after["callback_status_code"] is None


async def test_no_callback_url_leaves_callback_fields_null(client, agent):
    run = await submit(client, agent)
    await run_when(client, run["id"], terminal)
    await asyncio.sleep(0.1)  # past the callback lag: still nothing recorded
    after = await get_json(client, f"/v1/runs/{run['id']}")
    assert_same_shape(after, body("async_no_callback__run_after"))


# -- faults --------------------------------------------------------------------------------


async def test_callback_drop_records_an_unreachable_receiver(client, agent, receiver, sim):
    sim.set_faults(callback_drop=1.0)
    run = await submit(client, agent, callback_url=receiver.url())
    after = await run_when(client, run["id"], called_back)
    assert "ConnectError('All connection attempts failed')" in after["callback_error"]
    assert receiver.calls == []


async def test_callback_delay(client, agent, receiver, sim):
    sim.set_faults(callback_delay_s=0.3)
    run = await submit(client, agent, callback_url=receiver.url())
    done = await run_when(client, run["id"], terminal)
    await asyncio.sleep(0.2)
    assert receiver.calls == []
    after = await run_when(client, run["id"], called_back)
    lag = naive(after["callback_sent_at"]) - naive(done["completed_at"])
    assert lag.total_seconds() >= 0.35


async def test_answer_time_delays_the_answer_not_the_run(client, agent, sim):
    sim.set_faults(answer_time_s=(0.3, 0.3), run_duration_s=(0.0, 0.0), callback_lag_s=0.0)
    started = asyncio.get_running_loop().time()
    answer = asyncio.ensure_future(submit(client, agent))
    await eventually(lambda: list(sim.store.runs()))  # created before it answers
    assert not answer.done()
    run = await answer
    assert asyncio.get_running_loop().time() - started >= 0.3
    assert run["id"] == next(iter(sim.store.runs())).id
    assert run["status"] == "created"  # as Letta answers, though the turn ended meanwhile
    assert (await get_json(client, f"/v1/runs/{run['id']}"))["status"] == "completed"
    with pytest.raises(ValueError, match="answer_time_s must satisfy"):
        sim.set_faults(answer_time_s=(0.2, 0.1))


async def test_api_429_with_retry_after(client, agent, sim):
    sim.set_faults(api_429_rate=1.0, retry_after_s=2)
    response = await client.post(f"/v1/agents/{agent}/messages/async", json={"input": "x"})
    assert (response.status, response.headers["Retry-After"]) == (429, "2")
    assert list(sim.store.runs()) == []
    assert sim.calls[("POST", "/v1/agents/{agent_id}/messages/async")] == 1


async def test_api_5xx(client, agent, sim):
    sim.set_faults(api_5xx_rate=1.0)
    statuses = set()
    for _ in range(12):
        response = await client.get(f"/v1/agents/{agent}")
        statuses.add(response.status)
    assert statuses <= {500, 502, 503} and len(statuses) > 1


async def test_down_closes_connections_until_up(client, agent, sim):
    sim.go_down()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.get("/v1/health/")
    assert (await get_json(client, "/_sim/stats"))["calls"]["GET /v1/health"] == 1
    sim.come_up()
    await get_json(client, "/v1/health/")
    sim.down_for(0.2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post(f"/v1/agents/{agent}/messages/async", json={"input": "x"})
    await asyncio.sleep(0.25)
    await submit(client, agent)


async def test_lost_response_still_creates_the_run(client, agent, sim):
    sim.set_faults(response_drop=1.0)
    message = {"role": "user", "content": "once", "otid": "otid-1"}
    for _ in range(2):  # a client retrying after a lost answer submits twice
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.post(f"/v1/agents/{agent}/messages/async", json={"messages": [message]})
    assert sim.otid_counts()["otid-1"] == 2
    assert [r.run_id for r in sim.received] == [r.id for r in sim.store.runs()]


async def test_restart_loses_in_flight_runs(client, agent, receiver, sim):
    run = await submit(client, agent, "[[delay=0.2]]", callback_url=receiver.url())
    sim.restart()
    await asyncio.sleep(0.35)
    lost = await get_json(client, f"/v1/runs/{run['id']}")
    assert lost["status"] == "created" and lost["callback_sent_at"] is None
    assert receiver.calls == []
    fresh = await submit(client, agent, callback_url=receiver.url())
    await run_when(client, fresh["id"], called_back)


async def test_never_finishing_runs_can_still_be_cancelled(client, agent, sim):
    sim.set_faults(never_finish_rate=1.0)
    run = await submit(client, agent)
    await asyncio.sleep(0.15)
    assert (await get_json(client, f"/v1/runs/{run['id']}"))["status"] == "created"
    response = await client.post(f"/v1/agents/{agent}/messages/cancel", json={})
    assert await response.json() == {run["id"]: "cancelled"}
    await asyncio.sleep(0.1)
    assert (await get_json(client, f"/v1/runs/{run['id']}"))["status"] == "cancelled"


async def test_per_agent_faults_override_the_simulator(client, agent, sim):
    failing = sim.create_agent("failing", Faults(run_duration_s=(0.03, 0.03), fail_rate=1.0))
    bad = await submit(client, failing["id"])
    good = await submit(client, agent)
    assert (await run_when(client, bad["id"], terminal))["status"] == "failed"
    assert (await run_when(client, good["id"], terminal))["status"] == "completed"
    sim.set_faults(agent, api_429_rate=1.0)
    assert (await client.get(f"/v1/agents/{agent}")).status == 429
    assert (await client.get(f"/v1/agents/{failing['id']}")).status == 200


async def test_seeded_simulators_repeat_themselves(aiohttp_client):
    faults = Faults(run_duration_s=(0.01, 0.05), fail_rate=0.4, never_finish_rate=0.2,
                    callback_lag_s=0.01)

    async def play() -> list[tuple[str, str, str | None]]:
        sim = Simulator(seed=42, faults=faults)
        agent = sim.create_agent()["id"]
        client = await aiohttp_client(sim.app())
        runs = [await submit(client, agent, f"#{i}") for i in range(12)]
        await asyncio.sleep(0.15)
        listed = await get_json(client, "/v1/runs/", agent_id=agent, order="asc")
        assert [r["id"] for r in listed] == [r["id"] for r in runs]
        return [(r["status"], r["stop_reason"]) for r in listed]

    first, second = await play(), await play()
    assert first == second
    assert {status for status, _ in first} == {"completed", "failed", "created"}


# -- auth, controls, bookkeeping, command line ---------------------------------------------


async def test_api_key_required_when_set(aiohttp_client):
    sim = Simulator(api_key="secret", faults=FAST)
    client = await aiohttp_client(sim.app())
    response = await client.get("/v1/runs/", params={"limit": 1})
    assert (response.status, await response.json()) == (401, body("auth_secure__wrong_bearer"))
    response = await client.get("/v1/runs/", headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    assert (await client.get("/v1/health/")).status == 200
    for headers in ({"Authorization": "Bearer secret"}, {"X-BARE-PASSWORD": "password secret"}):
        response = await client.get("/v1/runs/", headers=headers)
        assert (response.status, await response.json()) == (200, [])


async def test_control_endpoints(client, sim):
    response = await client.post("/_sim/agents", json={"name": "ctl"})
    agent = (await response.json())["id"]
    many = await (await client.post("/_sim/agents", json={"count": 2})).json()
    assert len(many) == 2 and len(sim.store.agents) == 3
    response = await client.post("/_sim/faults", json={"down": True})
    assert (await response.json())["down"] is True
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.get("/v1/health/")
    await client.post("/_sim/faults", json={"down": False, "fail_rate": 1.0})
    run = await submit(client, agent, messages=[{"role": "user", "content": "x", "otid": "o"}])
    await submit(client, agent, messages=[{"role": "user", "content": "x", "otid": "o"}])
    await run_when(client, run["id"], terminal)
    runs = await get_json(client, "/_sim/runs")
    assert runs[0]["id"] == run["id"] and runs[0]["otids"] == ["o"]
    assert runs[0]["status"] == "failed" and "callback_error" in runs[0]
    stats = await get_json(client, "/_sim/stats")
    assert stats["otid_duplicates"] == {"o": 2} and stats["runs"] == 2
    assert stats["calls"]["POST /v1/agents/{agent_id}/messages/async"] == 2
    response = await client.post("/_sim/faults", json={"fail_rate": 3})
    assert response.status == 400
    response = await client.post("/_sim/faults", json={"down_for_s": 0.1})
    assert (await response.json())["down"] is True
    assert (await client.post("/_sim/restart")).status == 200
    await asyncio.sleep(0.15)
    assert (await client.delete(f"/_sim/runs/{run['id']}")).status == 200
    await get_json(client, f"/v1/runs/{run['id']}", status=404)


async def test_received_calls_and_deletes(client, agent, sim):
    run = await submit(client, agent, "recorded")
    assert [(r.agent_id, r.run_id) for r in sim.received] == [(agent, run["id"])]
    assert json.loads(sim.received[0].raw) == sim.received[0].body
    await get_json(client, f"/v1/runs/{run['id']}")
    await get_json(client, f"/v1/runs/{run['id']}")
    assert sim.calls[("GET", "/v1/runs/{run_id}")] == 2
    assert (await client.delete(f"/v1/runs/{run['id']}")).status == 200
    await get_json(client, f"/v1/runs/{run['id']}", status=404)
    assert await get_json(client, "/v1/runs/", agent_id=agent) == []
    other = await submit(client, agent)
    assert sim.delete_run(other["id"]) and not sim.delete_run(other["id"])
    await get_json(client, f"/v1/runs/{other['id']}/messages", status=404)


def test_command_line_options_build_faults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--seed", "3", "--agents", "2", "--callback-drop",
                              "0.5", "--run-duration", "0.1", "0.2", "--api-5xx-rate", "0.1",
                              "--answer-time", "0.05", "0.11"])
    assert (args.port, args.seed, args.agents) == (0, 3, 2)
    faults = faults_from_args(args)
    assert (faults.callback_drop, faults.run_duration_s, faults.api_5xx_rate) == (
        0.5, (0.1, 0.2), 0.1)
    assert faults.answer_time_s == (0.05, 0.11)
    assert faults.fail_rate == 0.0 and parser.parse_args([]).port == 8283
    assert faults_from_args(parser.parse_args([])).answer_time_s == (0.0, 0.0)


async def test_module_serves_from_the_command_line():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker.simulator", "--port", "0", "--agents", "2",
        "--seed", "5", cwd=root, env=env, stdout=asyncio.subprocess.PIPE,
    )
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode() for _ in range(3)]
        assert all(line.startswith("agent-") for line in lines[:2])
        url = lines[2].split()[-1]
        agent_url = f"{url}/v1/agents/{lines[0].strip()}"
        async with aiohttp.ClientSession() as session, session.get(agent_url) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
