"""Submit: recorded first, sent exactly once, in order per agent, idempotent."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sqlite3
import time
import uuid
from contextlib import closing

import pytest
from aiohttp import web

from tests.conftest import eventually, record_commits, user_key
from tracker.errors import LettaUnavailable, Unavailable
from tracker.letta import LettaClient
from tracker.letta_request import RUN_ID_PATTERN
from tracker.manager import new_run_id
from tracker.models import MAX_CANCEL_RUN_IDS

FULL_BODY = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look", "signature": "s"},
                                     {"type": "image", "source": {"type": "url",
                                                                  "url": "https://x/y.png"}}],
         "name": "ann", "sender_id": "user-1", "group_id": "g", "batch_item_id": "b",
         "otid": "my-otid", "type": "message"},
        {"role": "system", "content": "be brief"},
    ],
    "max_steps": 7,
    "include_return_message_types": ["assistant_message", "reasoning_message"],
    "callback_url": "https://example.com/hook",
    "client_tools": [{"name": "lookup", "description": "d", "parameters": {"type": "object"}}],
    "client_skills": [{"name": "s", "description": "d", "location": "skills/s/SKILL.md"}],
    "enable_thinking": "True",
    "include_compaction_messages": True,
    "override_model": "openai/gpt-4o",
    "override_system": "sys",
    "return_logprobs": True,
    "return_token_ids": False,
    "top_logprobs": 3,
    "use_assistant_message": False,
    "assistant_message_tool_name": "say",
    "assistant_message_tool_kwarg": "text",
    "some_future_field": {"kept": [1, 2]},
}


async def test_every_body_field_reaches_letta_unchanged(start_tracker, sim, agent):
    """All but the callback URL and the filter of the result's kinds, which the tracker
    applies itself (see test_a_long_result_of_hidden_kinds_is_read_whole_and_filtered_here)."""
    t = await start_tracker()
    resp = await t.post(f"/v1/agents/{agent}/messages/async", FULL_BODY)
    assert resp.status == 200, await resp.text()
    run = await resp.json()
    [received] = sim.received
    sent = received.body
    kept = ("callback_url", "messages", "include_return_message_types")
    for key, value in FULL_BODY.items():
        if key not in kept:
            assert sent[key] == value, key
    assert "include_return_message_types" not in sent
    assert run["request_config"]["include_return_message_types"] == \
        FULL_BODY["include_return_message_types"]
    assert sent["messages"][0] == FULL_BODY["messages"][0]
    # the second message had no otid: the tracker gave it one
    assert sent["messages"][1]["otid"] and sent["messages"][1]["content"] == "be brief"
    # Letta calls back the tracker, which keeps the user's URL for its relay
    assert sent["callback_url"].startswith(f"http://127.0.0.1:{t.svc.cfg.server.port}/callbacks")
    assert run["callback_url"] == "https://example.com/hook"
    assert run["request_config"]["use_assistant_message"] is False
    assert run["id"].startswith("run-") and run["id"] != run["tracker"]["letta_run_id"]
    assert run["tracker"]["state"] == "submitted"


async def test_run_is_committed_before_letta_is_called(start_tracker, sim, agent):
    t = await start_tracker()
    seen = []
    original = sim.submit
    path = t.svc.store.path

    def spy(agent_id, body, raw):
        # at the moment Letta gets the message, the tracker's row is committed, claimed: read
        # through a connection of its own, which sees only what is committed
        run_id = body["callback_url"].rsplit("/", 1)[1].rpartition(".")[0]
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchall()
        seen.append((run_id, rows))
        return original(agent_id, body, raw)

    sim.submit = spy
    run = await t.submit(agent)
    assert seen == [(run["id"], [("submitting",)])]
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    assert [e["kind"] for e in events][:2] == ["submit", "submitted"]


async def test_a_lone_submit_commits_at_once_and_submits_together_share_commits(
        start_tracker, sim, agent):
    """The only request in flight has no other request's writes to wait for: both its
    writes commit in its own tasks, with no turn of the loop spent on a drain. Submits in
    flight together still go through the drain and share commits."""
    sim.set_faults(run_duration_s=(30, 30))  # no callback comes in meanwhile
    t = await start_tracker()
    store = t.svc.store
    commits = record_commits(store)
    await t.submit(agent)
    assert commits == [(1, False), (1, False)]  # the insert, then Letta's answer
    commits.clear()
    agents = [sim.create_agent(f"together-{i}")["id"] for i in range(8)]  # lanes all free
    runs = await asyncio.gather(*(t.submit(a) for a in agents))
    assert all(r["tracker"]["state"] == "submitted" for r in runs)
    assert sum(n for n, _ in commits) == 16
    assert len(commits) < 16 and all(drained for n, drained in commits if n > 1)


async def test_refusals_record_and_send_nothing(start_tracker, sim, agent):
    t = await start_tracker(server={"max_body_bytes": 2048})
    cases = [
        ({"messages": [{"role": "robot", "content": "x"}]}, 422),
        ({"callback_url": "x"}, 422),
        ({"input": "x", "messages": [{"role": "user", "content": "y"}]}, 422),
        ({"input": "x", "max_steps": "many"}, 422),
        ({"input": "x" * 5000}, 413),
    ]
    for body, status in cases:
        resp = await t.post(f"/v1/agents/{agent}/messages/async", body)
        assert resp.status == status, (body, await resp.text())
        detail = (await resp.json())["detail"]
        if status == 422:
            assert isinstance(detail, list) and {"loc", "msg", "type"} <= detail[0].keys()
    resp = await t.client.post(f"/v1/agents/{agent}/messages/async", data=b"{not json",
                               headers={"Authorization": f"Bearer {t.key}",
                                        "Content-Type": "application/json"})
    assert resp.status == 400
    # half a surrogate pair: valid JSON syntax, but no UTF-8 text can hold it
    resp = await t.client.post(f"/v1/agents/{agent}/messages/async",
                               data=b'{"input": "half \\ud800 a pair"}',
                               headers={"Authorization": f"Bearer {t.key}",
                                        "Content-Type": "application/json"})
    assert resp.status == 400 and "surrogate" in (await resp.json())["detail"]
    # the same in UTF-16 (the escape's bytes have zeros between), or encoded, not escaped
    for raw in ('{"input": "half \\ud800 a pair"}'.encode("utf-16"),
                b'{"input": "half \xed\xa0\x80 a pair"}'):
        resp = await t.client.post(f"/v1/agents/{agent}/messages/async", data=raw,
                                   headers={"Authorization": f"Bearer {t.key}",
                                            "Content-Type": "application/json"})
        assert resp.status == 400, raw
    # an id with a newline after it (%0A) matched the pattern's `$`: a lane of its own
    for bad in ("not-an-agent", f"{agent}%0A"):
        resp = await t.post(f"/v1/agents/{bad}/messages/async", {"input": "x"})
        assert resp.status == 422, bad
        assert (await resp.json())["detail"][0]["loc"] == ["path", "agent_id"]
    assert (await t.get(f"/v1/runs/run-{uuid.uuid4()}%0A")).status == 400
    assert sim.received == []
    listing = await (await t.get("/v1/runs")).json()
    assert listing == []


async def test_a_chunked_body_past_the_limit_is_refused_before_its_end(start_tracker, agent):
    """A body sent chunked (no length said) was read whole before its size was checked, and
    the app reads up to the callbacks' 64 MiB: a client held that much a connection before
    its 413. It is refused as soon as what came is past server.max_body_bytes."""
    t = await start_tracker(server={"max_body_bytes": 2**20})
    url = t.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"POST /v1/agents/{agent}/messages/async HTTP/1.1\r\nHost: {url.host}\r\n"
                 f"Authorization: Bearer {t.key}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"x" * 65536
    for _ in range(20):  # 1.25 MiB, and the body's end never sent
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    try:
        status = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 413"), status


async def test_a_cancel_names_at_most_so_many_runs(start_tracker, agent):
    """Each run named is looked up on its own: a 1 MiB body of empty ids held the event loop
    (every request, every callback) for seconds."""
    t = await start_tracker()
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel",
                        {"run_ids": [""] * (MAX_CANCEL_RUN_IDS + 1)})
    assert resp.status == 422 and (await resp.json())["detail"][0]["loc"] == ["body", "run_ids"]
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel",
                        {"run_ids": [""] * MAX_CANCEL_RUN_IDS})
    assert resp.status == 200 and await resp.json() == {"": "failed"}


async def test_letta_4xx_fails_the_run_and_reaches_the_submitter(start_tracker, sim):
    t = await start_tracker()
    unknown = "agent-00000000-0000-4000-8000-000000000000"
    resp = await t.post(f"/v1/agents/{unknown}/messages/async", {"input": "x"})
    assert resp.status == 404
    assert await resp.json() == {"detail": "Agent not found"}
    [run] = await (await t.get("/v1/runs")).json()
    assert run["status"] == "failed" and run["tracker"]["state"] == "rejected"
    assert run["tracker"]["error_code"] == 404 and run["tracker"]["error"] == "Agent not found"
    # never at Letta, so Letta never said: shown as background, as every async run is, and
    # listed as it is shown (the filter missed it)
    assert run["background"] is True
    listed = await (await t.get("/v1/runs", background="true")).json()
    assert [r["id"] for r in listed] == [run["id"]]
    assert await (await t.get("/v1/runs", background="false")).json() == []


async def test_an_idempotency_key_not_utf8_or_too_long_is_refused(start_tracker, sim, agent):
    """Stored and shown as text, such a key failed at the insert: a 500."""
    t = await start_tracker()
    path = f"/v1/agents/{agent}/messages/async"
    body = json.dumps({"input": "x"}).encode()
    auth = {"Authorization": f"Bearer {t.key}".encode(), "Content-Type": b"application/json"}
    for key in (b"k-\xff", b"k" * 256):
        assert await t.raw_status("POST", path, {**auth, "Idempotency-Key": key}, body) == 422
    resp = await t.post(path, {"input": "x"}, headers={"Idempotency-Key": "k" * 255})
    assert resp.status == 200, await resp.text()
    assert len(sim.received) == 1


async def test_a_submit_whose_send_could_not_be_recorded_is_answered_as_stored(
        start_tracker, sim, agent):
    """Letta erred, and recording that failed too (the database): the client got a 503 for a
    run committed and, for all the client knows, at Letta, and a client that retries 5xx
    (Letta's SDKs do) sent the message a second time. The submit answers the run as stored;
    the rescue of stranded runs sends it once the database works."""
    t = await start_tracker()
    manager = t.svc.manager
    original = manager.requeue

    async def failing(*args, **kwargs):
        raise Unavailable("database write failed: disk I/O error")

    manager.requeue = failing
    sim.set_faults(api_5xx_rate=1.0)
    resp = await t.post(f"/v1/agents/{agent}/messages/async", {"input": "once"})
    assert resp.status == 200, await resp.text()
    run = await resp.json()
    assert run["tracker"]["state"] == "submitting"
    manager.requeue = original
    sim.set_faults(api_5xx_rate=0.0)
    done = await t.wait_state(run["id"], "done", timeout=20)
    assert done["status"] == "completed" and len(sim.received) == 1


async def test_letta_down_then_back_nothing_lost_nothing_doubled(start_tracker, sim, agent):
    t = await start_tracker()
    sim.go_down()
    runs = [await t.submit(agent, f"m{i}") for i in range(3)]
    assert all(r["tracker"]["state"] in ("queued", "submitting") for r in runs)
    await asyncio.sleep(0.3)
    sim.come_up()
    for r in runs:
        await t.wait_state(r["id"], "done")
    assert len(sim.received) == 3
    assert [rec.body["messages"][0]["content"] for rec in sim.received] == ["m0", "m1", "m2"]
    assert max(sim.otid_counts().values()) == 1


async def test_a_proxys_404_while_letta_restarts_loses_no_run_and_refuses_no_message(
        start_tracker, sim, agent, aiohttp_server):
    """Behind a proxy (Traefik, say), a Letta restarting has no route for a moment: the proxy
    answers 404 with its own page. Taken as Letta's "not found", every run polled then was
    given up as lost and every message sent refused. Letta's own 404 is FastAPI's JSON."""
    import aiohttp

    down = [False]

    async def proxy(request: web.Request) -> web.Response:
        if down[0]:
            return web.Response(status=404, text="404 page not found")
        async with aiohttp.ClientSession() as session, session.request(
                request.method, sim.url + request.path_qs, data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k != "Host"}) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    front = await aiohttp_server(app)
    sim.set_faults(callback_drop=1.0)  # polls learn the outcome
    t = await start_tracker(letta={"base_url": str(front.make_url("")).rstrip("/")})
    polled = await t.submit(agent, "[[delay=0.8]] polled while the route is gone")
    down[0] = True
    other = sim.create_agent("other")["id"]  # its lane free: sent now
    refused = await t.post(f"/v1/agents/{other}/messages/async", {"input": "sent meanwhile"})
    assert refused.status == 200, await refused.text()
    sent = await refused.json()
    assert sent["tracker"]["state"] == "queued" and "404" in sent["tracker"]["error"]
    await asyncio.sleep(1.0)  # polls meet the proxy's 404
    down[0] = False
    for run in (polled, sent):
        done = await t.wait_state(run["id"], "done", timeout=15)
        assert done["status"] == "completed", done
    assert len(sim.received) == 2 and max(sim.otid_counts().values()) == 1


async def test_5xx_and_429_are_retried_without_doubling(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(api_5xx_rate=1.0)
    run = await t.submit(agent)
    assert run["tracker"]["state"] == "queued"
    sim.set_faults(api_5xx_rate=0.0, api_429_rate=1.0, retry_after_s=0.2)
    await asyncio.sleep(0.3)
    sim.set_faults(api_429_rate=0.0)
    await t.wait_state(run["id"], "done")
    assert max(sim.otid_counts().values()) == 1


async def test_lost_response_is_found_again_not_resent(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(response_drop=1.0)
    run = await t.submit(agent)
    sim.set_faults(response_drop=0.0)
    done = await t.wait_state(run["id"], "done")
    assert len(sim.received) == 1 and done["tracker"]["letta_run_id"]
    kinds = [e["kind"] for e in await (await t.get(f"/v1/runs/{run['id']}/events")).json()]
    assert "found_in_letta" in kinds


async def test_send_without_answer_is_looked_up_only_once_it_could_have_landed(
        start_tracker, sim, agent):
    """A Letta too slow to answer before our timeout may create the run after we gave up: the
    look for it waits ``dispatch.lookup_after_s``, so it finds the run, not send it again."""
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={"lookup_after_s": 1.0})
    sim.set_faults(accept_delay_s=0.7)
    landed_by = time.monotonic() + 0.8
    run = await t.submit(agent)
    assert run["tracker"]["state"] == "queued" and not sim.received  # timed out, not there yet
    sim.set_faults(accept_delay_s=0.0)
    done = await t.wait_state(run["id"], "done")
    await asyncio.sleep(landed_by - time.monotonic())  # a second send would be there by now
    assert len(sim.received) == 1 and done["tracker"]["letta_run_id"] == sim.received[0].run_id
    kinds = [e["kind"] for e in await (await t.get(f"/v1/runs/{run['id']}/events")).json()]
    assert "found_in_letta" in kinds


async def test_a_callback_for_a_run_queued_to_be_looked_up_looks_at_once(
        start_tracker, sim, agent):
    """Letta created the run but answered the send too late; its callback, come while the
    run waited for its look (dispatch.lookup_after_s), was ignored, and the outcome learnt
    that long after. The callback proves Letta has it: the look goes at once."""
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={"lookup_after_s": 30})
    sim.set_faults(answer_time_s=(0.6, 0.6))
    run = await t.submit(agent, "[[delay=0.6]] x")
    sim.set_faults(answer_time_s=(0.0, 0.0))
    done = await t.wait_state(run["id"], "done", timeout=5)
    assert len(sim.received) == 1 and done["status"] == "completed"
    assert "look_now" in [e["kind"] for e in await (await t.get(
        f"/v1/runs/{run['id']}/events")).json()]


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_callback_letta_cannot_vouch_for_still_looks_at_once(
        start_tracker, sim, agent, unused_tcp_port_factory, workers, caplog):
    """The same, with Letta erring on the GET that vouches for the callback (which names a
    Letta run the tracker has not recorded): the callback was answered 503 and dropped, and
    the run looked up only after dispatch.lookup_after_s. It is looked up at once, in the
    service or in a callback worker, which reports it."""
    sections = {"callbacks": {"workers": 1, "port": unused_tcp_port_factory()}} if workers else {}
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={"lookup_after_s": 30},
                            **sections)
    sim.set_faults(answer_time_s=(0.6, 0.6))
    run = await t.submit(agent, "[[delay=0.6]] x")
    sim.set_faults(answer_time_s=(0.0, 0.0), api_5xx_rate=1.0)  # every GET, each retry too

    async def looked() -> list[dict]:
        events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
        return [e for e in events if e["kind"] == "look_now"]

    [look] = await eventually(looked, timeout=8)
    assert look["detail"] == {"letta_run_id": sim.received[0].run_id, "vouched": False}
    if not workers:  # Letta's outage, handled: logged as a warning, not as the tracker's error
        answered = [r for r in caplog.records if "could not confirm" in r.getMessage()]
        assert answered and {r.levelno for r in answered} == {logging.WARNING}
    # the answer reaches the simulator after the applier may have acted on the callback
    await eventually(lambda: sim.store.get(sim.received[0].run_id).callback_status_code == 503)
    sim.set_faults(api_5xx_rate=0.0)
    done = await t.wait_state(run["id"], "done", timeout=8)
    assert len(sim.received) == 1 and done["status"] == "completed"


async def test_a_callback_letta_cannot_vouch_for_while_the_send_waits_hastens_its_look(
        start_tracker, sim, agent):
    """The same callback, come while the send still waits for Letta's answer: the send then
    got none, and its look waited dispatch.lookup_after_s, as if Letta might not have the run
    yet. The callback shows it has: the look goes at once."""
    t = await start_tracker(letta={"timeout_s": 3.0}, dispatch={"lookup_after_s": 30})
    sim.set_faults(answer_time_s=(4.0, 4.0))
    submit = asyncio.create_task(t.submit(agent, "[[delay=0.2]] x"))
    await eventually(lambda: sim.received)  # at Letta, its answer 4 s away
    sim.set_faults(api_5xx_rate=1.0)  # the callback, in ~0.4 s, is not vouched for by ~1.5 s
    run = await submit  # Letta's answer not come in 3 s
    assert run["tracker"]["state"] == "queued"
    sim.set_faults(api_5xx_rate=0.0, answer_time_s=(0.0, 0.0))
    done = await t.wait_state(run["id"], "done", timeout=10)
    assert len(sim.received) == 1 and done["status"] == "completed"
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    [noted] = [e for e in events if e["detail"] == {
        "letta_run_id": sim.received[0].run_id, "vouched": False,
        "if": "the send gets no answer"}]
    assert noted["state"] == "submitting"  # the run's state as it was noted
    assert not t.svc.manager.called_back  # the note went with its send


async def test_a_cancel_before_the_look_is_due_fails_and_the_order_holds(
        start_tracker, sim, agent):
    """A run whose send got no answer is queued to be looked up later. Cancelled meanwhile,
    it was looked for at once, not found (Letta had not created it yet), marked cancelled,
    and the message behind it sent; then Letta created the first: delivered after the
    second, though reported cancelled. The cancel now fails while the look is not due."""
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={"lookup_after_s": 1.5})
    sim.set_faults(accept_delay_s=0.8)
    first = await t.submit(agent, "first")
    sim.set_faults(accept_delay_s=0.0)
    second = await t.submit(agent, "second")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [first["id"]]})
    assert await resp.json() == {first["id"]: "failed"}
    assert (await t.run(first["id"]))["tracker"]["state"] == "queued"
    await t.wait_state(first["id"], "done")
    await t.wait_state(second["id"], "done")
    assert [rec.body["messages"][0]["content"] for rec in sim.received] == ["first", "second"]


async def test_an_otid_a_client_used_twice_neither_blocks_the_lane_nor_misattaches(
        start_tracker, sim, agent):
    """The look for a send that got no answer matched, by otid, the Letta run of an earlier
    message carrying the same otid (the client's own): attaching it failed (another run's),
    every try, and the agent's lane stayed blocked for good. Not found, it is sent."""
    t = await start_tracker()
    body = {"messages": [{"role": "user", "content": "same", "otid": "client-otid-1"}]}
    resp = await t.post(f"/v1/agents/{agent}/messages/async", body)
    first = await resp.json()
    await t.wait_state(first["id"], "done")
    sim.go_down()
    resp = await t.post(f"/v1/agents/{agent}/messages/async", body)
    again = await resp.json()
    after = await t.submit(agent, "after")
    await asyncio.sleep(0.3)
    sim.come_up()
    done = await t.wait_state(again["id"], "done")
    await t.wait_state(after["id"], "done")
    assert done["tracker"]["letta_run_id"] != first["tracker"]["letta_run_id"]
    assert [rec.body["messages"][0]["content"] for rec in sim.received] == [
        "same", "same", "after"]


def test_a_gateways_502_503_504_is_no_answer_from_letta():
    """A gateway in front of a slow Letta answers 504 while Letta may still create the run:
    looked up at the next back-off, it was missed and sent again (see lookup_after_s)."""
    from tracker.letta_http import Answer

    for status, answered in ((500, True), (502, False), (503, False), (504, False)):
        with pytest.raises(LettaUnavailable) as e:
            LettaClient._answered(Answer(status, {}, b'{"detail": "x"}'))
        assert (e.value.sent, e.value.answered) == (True, answered), status


async def test_serial_lanes_keep_order_across_agents(start_tracker, sim):
    t = await start_tracker()
    agents = [sim.create_agent(f"a{i}")["id"] for i in range(3)]
    runs = [await t.submit(a, f"{a}-{i}") for i in range(4) for a in agents]
    for r in runs:
        await t.wait_state(r["id"], "done", timeout=20)
    for a in agents:
        sent = [rec for rec in sim.received if rec.agent_id == a]
        contents = [rec.body["messages"][0]["content"] for rec in sent]
        assert contents == [f"{a}-{i}" for i in range(4)]
        letta_runs = [sim.store.get(rec.run_id) for rec in sent]
        # never two runs of one agent at Letta at the same time
        for prev, nxt in zip(letta_runs, letta_runs[1:], strict=False):
            assert prev.completed_at <= nxt.created_at


async def test_parallel_sends_at_once(start_tracker, sim, agent):
    t = await start_tracker(dispatch={"per_agent": "parallel"})
    runs = await asyncio.gather(*(t.submit(agent, f"[[delay=0.5]] p{i}") for i in range(3)))
    for r in runs:
        await t.wait_state(r["id"], "done")
    letta_runs = [sim.store.get(rec.run_id) for rec in sim.received]
    # all three ran at Letta at the same time
    assert max(r.created_at for r in letta_runs) < min(r.completed_at for r in letta_runs)


async def test_queue_survives_a_restart_in_order(start_tracker, sim, agent):
    t = await start_tracker()
    sim.go_down()
    runs = [await t.submit(agent, f"q{i}") for i in range(3)]
    await t.client.close()
    sim.come_up()
    t2 = await start_tracker()
    for r in runs:
        await t2.wait_state(r["id"], "done")
    assert [rec.body["messages"][0]["content"] for rec in sim.received] == ["q0", "q1", "q2"]
    assert max(sim.otid_counts().values()) == 1


async def test_idempotency_key(start_tracker, sim, agent):
    t = await start_tracker()
    path = f"/v1/agents/{agent}/messages/async"
    body = {"input": "once"}
    first, second = await asyncio.gather(
        t.post(path, body, headers={"Idempotency-Key": "k-1"}),
        t.post(path, body, headers={"Idempotency-Key": "k-1"}))
    a, b = await first.json(), await second.json()
    assert first.status == second.status == 200 and a["id"] == b["id"]
    again = await t.post(path, body, headers={"Idempotency-Key": "k-1"})
    assert (await again.json())["id"] == a["id"]
    other = await t.post(path, {"input": "different"}, headers={"Idempotency-Key": "k-1"})
    assert other.status == 409
    await eventually(lambda: len(sim.received) == 1)
    await asyncio.sleep(0.2)
    assert len(sim.received) == 1


async def approve(t, agent_id: str, call_id: str) -> dict:
    """Submit an approval of the tool call ``call_id`` through the tracker."""
    resp = await t.post(f"/v1/agents/{agent_id}/messages/async", {"messages": [
        {"type": "approval", "approvals": [{"type": "approval", "approve": True,
                                            "tool_call_id": call_id}]}]})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def asked_call_id(t, paused_id: str) -> str:
    """The tool call a paused run asks approval for (its last message)."""
    messages = await (await t.get(f"/v1/runs/{paused_id}/messages")).json()
    return messages[-1]["tool_call"]["tool_call_id"]


async def test_requires_approval_holds_the_lane_for_the_answer(start_tracker, sim, agent):
    t = await start_tracker()
    paused = await t.submit(agent, "[[approval]] do it")
    await t.wait_state(paused["id"], "paused")
    waiting = await t.submit(agent, "after")
    await asyncio.sleep(0.3)
    assert (await t.run(waiting["id"]))["tracker"]["state"] == "queued"
    answer = await approve(t, agent, await asked_call_id(t, paused["id"]))
    await t.wait_state(answer["id"], "done")
    await t.wait_state(waiting["id"], "done")
    order = [json.dumps(rec.body["messages"][0]) for rec in sim.received]
    assert "approval" in order[1] and "after" in order[2]
    assert (await t.run(paused["id"]))["tracker"]["state"] == "done"


async def test_an_approval_letta_fails_as_of_other_tool_calls_leaves_the_pause(
        start_tracker, sim, agent):
    """Letta takes an approval's run, then fails it when it names other tool calls than those
    asked about, and its agent goes on waiting: ended when Letta took the answer, the pause
    let the message queued behind it go, and Letta failed it (PendingApprovalError). It now
    waits for an answer Letta does not fail."""
    t = await start_tracker()
    paused = await t.submit(agent, "[[approval]] do it")
    await t.wait_state(paused["id"], "paused")
    waiting = await t.submit(agent, "after")
    wrong = await t.wait_state((await approve(t, agent, "call-other"))["id"], "done")
    assert wrong["status"] == "failed" and "Invalid tool call IDs" in wrong["metadata"]["error"]
    await asyncio.sleep(0.3)
    assert (await t.run(paused["id"]))["tracker"]["state"] == "paused"
    assert (await t.run(waiting["id"]))["tracker"]["state"] == "queued"
    right = await approve(t, agent, await asked_call_id(t, paused["id"]))
    assert (await t.wait_state(right["id"], "done"))["status"] == "completed"
    after = await t.wait_state(waiting["id"], "done")
    assert (after["status"], after["stop_reason"]) == ("completed", "end_turn")
    assert (await t.run(paused["id"]))["tracker"]["state"] == "done"


async def test_only_the_user_whose_run_paused_can_answer_it(start_tracker, sim, agent):
    """Bob's approval of Alice's paused tool call went ahead of the queue to Letta: it decided
    Alice's tool call (or, naming another call, Letta's refusal told Bob Alice's call ids),
    and ended her run's pause. It is refused; Alice's answer goes."""
    t = await start_tracker()
    alice, bob = await user_key(t, "alice"), await user_key(t, "bob")
    paused = await (await t.post(f"/v1/agents/{agent}/messages/async",
                                 {"input": "[[approval]] do it"}, key=alice)).json()
    await t.wait_state(paused["id"], "paused")
    call_id = await asked_call_id(t, paused["id"])
    approval = {"messages": [{"type": "approval", "approvals": [
        {"type": "approval", "approve": True, "tool_call_id": call_id}]}]}
    resp = await t.post(f"/v1/agents/{agent}/messages/async", approval, key=bob)
    assert resp.status == 409, await resp.text()
    assert "another user's run" in (await resp.json())["detail"]
    assert len(sim.received) == 1
    assert (await t.run(paused["id"]))["tracker"]["state"] == "paused"
    resp = await t.post(f"/v1/agents/{agent}/messages/async", approval, key=alice,
                        headers={"Idempotency-Key": "alice-approves"})
    assert resp.status == 200, await resp.text()
    answered = (await resp.json())["id"]
    await t.wait_state(answered, "done")
    assert (await t.run(paused["id"]))["tracker"]["state"] == "done"
    # Bob's run pauses next; Alice's client, its first answer lost, retries the same request:
    # it answers the run it made, not a 409 for Bob's pause
    bobs = await (await t.post(f"/v1/agents/{agent}/messages/async",
                               {"input": "[[approval]] mine"}, key=bob)).json()
    await t.wait_state(bobs["id"], "paused")
    resp = await t.post(f"/v1/agents/{agent}/messages/async", approval, key=alice,
                        headers={"Idempotency-Key": "alice-approves"})
    assert resp.status == 200 and (await resp.json())["id"] == answered


async def test_a_pause_reported_after_its_cancel_neither_pauses_nor_holds_the_lane(
        start_tracker, sim, agent):
    """Letta paused the run and sent its one callback; the user cancelled before it came.
    Applied late, the pause made the run `paused` (never looked at again: Letta had it
    cancelled) and held the agent's lane until a second cancel."""
    sim.set_faults(callback_delay_s=1.0)
    t = await start_tracker(polling={"grace_s": 5})  # no poll sees the pause first
    run = await t.submit(agent, "[[approval]] do it")
    letta_id = run["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).stop_reason == "requires_approval")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    behind = await t.submit(agent, "next")
    final = await t.wait_state(run["id"], "done")
    assert (final["status"], final["stop_reason"]) == ("cancelled", "cancelled")
    assert (await t.wait_state(behind["id"], "done"))["status"] == "completed"


async def test_a_pause_seen_before_a_cancel_and_recorded_after_it_holds_no_lane(
        start_tracker, sim, agent):
    """A poll read the run, then Letta's pause; the user's cancel was taken (Letta cancelled
    the paused run) and recorded; then the poll's pause, read before the cancel, was applied:
    the run recorded paused, never looked at again, its agent's lane held."""
    from tracker.manager import Observation
    from tracker.states import Source

    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 30})  # no poll of its own meanwhile
    run = await t.submit(agent, "[[approval]] do it")
    letta_id = run["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).stop_reason == "requires_approval")
    manager = t.svc.manager
    read = await t.svc.store.get_run(run["id"])  # the poll's read of the run, and of Letta's
    seen = Observation.from_run(await manager.letta.get_run(letta_id))
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    await manager.apply_remote(read, seen, Source.POLL)
    sim.set_faults(callback_drop=0.0)
    behind = await t.submit(agent, "next")
    final = await t.wait_state(run["id"], "done")
    assert (final["status"], final["stop_reason"]) == ("cancelled", "cancelled")
    assert (await t.wait_state(behind["id"], "done"))["status"] == "completed"


async def test_a_cancel_whose_run_paused_meanwhile_releases_the_pause(start_tracker, sim,
                                                                      agent):
    """The cancel read the run as running; its pause was recorded before Letta took the
    cancel, which Letta applied to the paused run. The cancel's note, for a running run,
    missed: the run stayed paused, its agent's lane held, though Letta had cancelled it."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 30})
    run = await t.submit(agent, "[[approval]] do it")
    letta_id = run["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).stop_reason == "requires_approval")
    manager = t.svc.manager
    read = await t.svc.store.get_run(run["id"])
    real_cancel = manager.letta.cancel

    async def paused_first(agent_id, run_ids):  # the pause recorded while the cancel goes
        from tracker.manager import Observation
        from tracker.states import Source

        seen = Observation.from_run(await manager.letta.get_run(letta_id))
        assert (await manager.apply_remote(read, seen, Source.POLL)).state == "paused"
        return await real_cancel(agent_id, run_ids)

    manager.letta.cancel = paused_first
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    final = await t.run(run["id"])
    assert (final["tracker"]["state"], final["status"]) == ("done", "cancelled")
    sim.set_faults(callback_drop=0.0)
    behind = await t.submit(agent, "next")
    assert (await t.wait_state(behind["id"], "done"))["status"] == "completed"


async def test_a_poll_read_before_a_cancel_leaves_the_cancels_look_soon(start_tracker, sim,
                                                                        agent):
    """A poll read the run, and Letta's, before the user's cancel was taken, and recorded what
    it saw after the cancel: the run's status back to running and its next look a backoff away
    (up to polling.max_interval_s, 300 s), the agent's lane held meanwhile when the cancel's
    callback was missed. What the cancel recorded stands."""
    import dataclasses

    from tracker import clock

    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 30, "max_interval_s": 300})
    run = await t.submit(agent, "[[delay=2]] cancelled while a poll looks")
    store, poller = t.svc.store, t.svc.poller
    read = dataclasses.replace(await store.get_run(run["id"]), poll_count=20)  # a long run's
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    await poller._still_active(read, {"status": "running"})  # the poll's late record
    await poller._reschedule_active([read])
    stored = await store.get_run(run["id"])
    assert stored.status == "cancelled" and stored.next_check_at < clock.now() + 5
    await t.wait_state(run["id"], "done", timeout=15)


async def test_a_cancelled_answer_is_final_only_once_its_step_has_ended(start_tracker, sim,
                                                                          agent):
    """An answer's first step runs under the paused run's step (letta_agent_v3.py), so the
    answer run lists no step while its approved tool runs: taken for a step ended, its cancel
    was final after cancel_confirm_s, the agent's next message went beside the running tool,
    and Letta's overwrite to `completed` at the step's end was never seen."""
    t = await start_tracker(polling={"min_interval_s": 0.1, "max_interval_s": 0.2,
                                     "cancel_confirm_s": 0.3})
    paused = await t.submit(agent, "[[approval]] do it")
    await t.wait_state(paused["id"], "paused")
    sim.set_faults(run_duration_s=(2.0, 2.0), callback_drop=1.0)  # polls alone see it
    answer = await approve(t, agent, await asked_call_id(t, paused["id"]))
    await t.wait_state(answer["id"], "submitted")  # at Letta (not cancelled here, queued)
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [answer["id"]]})
    assert await resp.json() == {answer["id"]: "cancelled"}
    behind = await t.submit(agent, "after the answer")
    final = await t.wait_state(answer["id"], "done")
    assert (final["status"], final["stop_reason"]) == ("completed", "end_turn")
    await t.wait_state(behind["id"], "done")
    letta_answer = sim.store.get(final["tracker"]["letta_run_id"])
    sent_behind = next(r.at for r in sim.received if r.run_id != letta_answer.id
                       and r.body.get("messages", [{}])[0].get("content") == "after the answer")
    finished = letta_answer.created_at.timestamp() + letta_answer.run_ns / 1e9
    assert sent_behind >= finished


async def test_a_json_media_type_is_taken_in_any_case(start_tracker, sim, agent):
    """Media types are case-insensitive (RFC 9110): `Application/JSON` was a 415."""
    t = await start_tracker()
    resp = await t.client.post(f"/v1/agents/{agent}/messages/async", data=b'{"input": "x"}',
                               headers={"Authorization": f"Bearer {t.key}",
                                        "Content-Type": "Application/JSON; charset=UTF-8"})
    assert resp.status == 200, await resp.text()


async def test_cancelling_a_paused_run_cancels_it_at_letta_before_the_lane_goes_on(
        start_tracker, sim, agent, webhook):
    """Released only here, the pause stayed at Letta, whose agent, awaiting its approval,
    failed the message queued behind it (and every later one). The cancel is a new outcome:
    the callback_url told of the pause is told of it (the cancel may be an admin's cancel-all
    the user never saw), and it is when the outcome was recorded."""
    url, delivered = webhook
    t = await start_tracker()
    paused = await t.submit(agent, "[[approval]] do it", callback_url=url)
    paused_at = (await t.wait_state(paused["id"], "paused"))["tracker"]["recorded_at"]
    await eventually(lambda: delivered)
    await asyncio.sleep(0.01)  # recorded_at has whole-millisecond steps at least
    waiting = await t.submit(agent, "after")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [paused["id"]]})
    assert await resp.json() == {paused["id"]: "cancelled"}
    after = await t.wait_state(waiting["id"], "done")
    assert (after["status"], after["stop_reason"]) == ("completed", "end_turn")
    run = await t.run(paused["id"])
    assert (run["tracker"]["state"], run["status"]) == ("done", "cancelled")
    letta_run = sim.store.get(run["tracker"]["letta_run_id"])
    assert (letta_run.status, letta_run.stop_reason) == ("cancelled", "cancelled")
    assert run["tracker"]["recorded_at"] > paused_at
    await eventually(lambda: len(delivered) == 2)
    assert [(d["status"], d["metadata"]["result"]["stop_reason"]["stop_reason"])
            for d in delivered] == [("completed", "requires_approval"), ("cancelled", "cancelled")]


async def test_a_key_letta_refuses_queues_the_message_until_it_takes_it(start_tracker, sim,
                                                                        agent):
    """A 401 is Letta refusing our key (being rotated, mistyped), not the message: rejected,
    every message sent meanwhile was lost for good. It waits, and goes once Letta takes the
    key, exactly once."""
    sim.api_key = "the-new-key"
    t = await start_tracker(letta={"api_key": "the-old-key"},
                            dispatch={"retry_min_s": 0.1, "retry_max_s": 0.2})
    run = await t.submit(agent, "while the key is wrong")
    assert run["tracker"]["state"] == "queued"
    await asyncio.sleep(0.5)  # a few tries, each refused (one may be under way: submitting)
    state = (await t.run(run["id"]))["tracker"]["state"]
    assert state in ("queued", "submitting") and not sim.received
    sim.api_key = "the-old-key"  # Letta takes it again (or the operator fixed the key)
    done = await t.wait_state(run["id"], "done")
    assert done["status"] == "completed" and len(sim.received) == 1


def test_run_ids_have_lettas_form_and_sort_by_creation():
    """Run ids match Letta's run id pattern (UUID version 4's form), and later ones sort
    later: each insert extends the indexes on ids at their end."""
    batches = []
    for _ in range(3):  # a millisecond or more apart
        batches.append([new_run_id() for _ in range(1000)])
        time.sleep(0.002)
    ids = [i for batch in batches for i in batch]
    assert all(re.match(RUN_ID_PATTERN, i) for i in ids)
    assert all(uuid.UUID(i[4:]).version == 4 and str(uuid.UUID(i[4:])) == i[4:] for i in ids)
    assert len(set(ids)) == len(ids)
    assert max(batches[0]) < min(batches[1]) and max(batches[1]) < min(batches[2])


async def test_lettas_answers_are_read_whole(aiohttp_server):
    """Letta's answers are read as Python's json reads them: an integer past 64 bits stays
    exact (orjson would make it a float), NaN is taken; an answer that is not JSON at all (a
    proxy's error page) is its detail."""
    answers = {"big": (200, b'{"id": "run-1", "n": 123456789012345678901234567890}'),
               "nan": (200, b'{"id": "run-2", "x": NaN}'),
               "page": (502, b"<html>Bad Gateway</html>")}

    async def get_run(request: web.Request) -> web.Response:
        status, body = answers[request.match_info["run_id"]]
        return web.Response(status=status, body=body, content_type="application/json")

    fake = web.Application()
    fake.router.add_get("/v1/runs/{run_id}", get_run)
    letta = LettaClient(str((await aiohttp_server(fake)).make_url("")))
    await letta.start()
    try:
        assert (await letta.get_run("big"))["n"] == 123456789012345678901234567890
        assert math.isnan((await letta.get_run("nan"))["x"])
        with pytest.raises(LettaUnavailable, match="502: <html>Bad Gateway</html>"):
            await letta.get_run("page")
    finally:
        await letta.close()


async def test_one_info_line_per_submit_on_its_way(start_tracker, sim, agent, caplog):
    # sent at once: "run submitted" says all; queued behind its agent's lane: "run queued"
    # first, then "run submitted" when its turn comes
    t = await start_tracker()
    with caplog.at_level(logging.INFO, "tracker"):
        first = await t.submit(agent, "[[delay=0.3]] first")
        second = await t.submit(agent, "second")
        await t.wait_state(second["id"], "done")

    def lines(run_id: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if getattr(r, "run_id", None) == run_id and r.name in (
                    "tracker.manager", "tracker.dispatcher")]

    assert lines(first["id"])[:1] == ["run submitted"]
    assert lines(second["id"])[:2] == ["run queued", "run submitted"]
