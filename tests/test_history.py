"""History over REST: Letta's list semantics, tracker filters, per-user access, stats."""

from __future__ import annotations

import json
import uuid

from openapi_spec_validator import validate as validate_openapi

from tests import samples
from tests.conftest import eventually, user_key
from tests.test_letta_request import walk
from tracker import manager as manager_module
from tracker.serialize import json_response


async def test_users_see_only_their_own_runs(start_tracker, sim, agent):
    t = await start_tracker()
    alice, bob = await user_key(t, "alice"), await user_key(t, "bob")
    mine = await (await t.post(f"/v1/agents/{agent}/messages/async", {"input": "a"},
                               key=alice)).json()
    await t.wait_state(mine["id"], "done")
    letta_id = (await t.run(mine["id"]))["tracker"]["letta_run_id"]
    for path in (f"/v1/runs/{mine['id']}", f"/v1/runs/{letta_id}",
                 f"/v1/runs/{mine['id']}/messages", f"/v1/runs/{mine['id']}/usage",
                 f"/v1/runs/{mine['id']}/events", f"/v1/runs/{mine['id']}/deliveries"):
        assert (await t.get(path, key=bob)).status == 404, path
        assert (await t.get(path, key=alice)).status == 200, path
    assert await (await t.get("/v1/runs", key=bob)).json() == []
    assert await (await t.get("/v1/runs", key=bob, agent_id=agent)).json() == []
    assert (await (await t.get("/v1/stats", key=bob)).json())["total"] == 0
    cancel = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [mine["id"]]},
                          key=bob)
    assert await cancel.json() == {mine["id"]: "failed"}
    # the admin sees everyone's
    assert [r["id"] for r in await (await t.get("/v1/runs")).json()] == [mine["id"]]


async def test_no_key_bad_key_revoked_key(start_tracker, sim):
    t = await start_tracker()
    assert (await t.client.get("/v1/runs")).status == 401
    assert (await t.get("/v1/runs", key="tk_nope")).status == 401
    # a key whose bytes are not UTF-8 is refused as any unknown key (it was a 500)
    assert await t.raw_status("GET", "/v1/runs", {"Authorization": b"Bearer tk_\xff"}) == 401
    key = await user_key(t, "carol")
    assert (await t.get("/v1/runs", key=key)).status == 200
    [listed] = [k for k in await t.svc.store.list_keys() if k.user_name == "carol"]
    assert await t.svc.store.revoke_key(listed.id) == 1
    assert (await t.get("/v1/runs", key=key)).status == 401
    # public routes need no key
    assert (await t.client.get("/healthz")).status == 200
    assert (await t.client.head("/healthz")).status == 200  # a probe may send HEAD
    assert (await t.client.get("/openapi.json")).status == 200


async def test_filters_and_letta_list_semantics(start_tracker, sim):
    # completed_via is asserted below: the callbacks must come before any poll (CI failed
    # this once with the test config's 0.3 s grace, the poll first on a loaded machine)
    t = await start_tracker(polling={"grace_s": 30})
    a1, a2 = sim.create_agent("a1")["id"], sim.create_agent("a2")["id"]
    ok = [await t.submit(a1, f"ok{i}") for i in range(3)]
    failed = await t.submit(a2, "[[fail]] boom")
    for r in [*ok, failed]:
        await t.wait_state(r["id"], "done")

    async def ids(**params):
        resp = await t.get("/v1/runs", **params)
        assert resp.status == 200, await resp.text()
        return [r["id"] for r in await resp.json()]

    assert await ids(agent_id=a1) == [r["id"] for r in reversed(ok)]
    assert await ids(agent_id=a1, order="asc") == [r["id"] for r in ok]
    assert await ids(statuses="failed") == [failed["id"]]
    assert await ids(stop_reason="error") == [failed["id"]]
    assert await ids(active="true") == []
    assert await ids(state="done", agent_id=a2) == [failed["id"]]
    assert await ids(completed_via="callback", agent_id=a2) == [failed["id"]]
    assert await ids(callback_missed="true") == []
    assert len(await ids(background="true")) == 4 and await ids(background="false") == []
    assert len(await ids(created_after="2020-01-01T00:00:00Z")) == 4
    assert await ids(created_before="2020-01-01T00:00:00Z") == []
    assert await ids(agent_id="agent-00000000-0000-4000-8000-000000000000") == []
    page = await ids(limit=2)
    rest = await ids(limit=10, after=page[-1])
    assert page + rest == await ids(limit=10)
    resp = await t.client.get("/v1/runs", params=[("statuses", "completed"),
                                                  ("statuses", "failed")],
                              headers={"Authorization": f"Bearer {t.key}"})
    assert len(await resp.json()) == 4


async def finished_runs(t, agents: list[str], n: int, text: str = "ok") -> list[dict]:
    """``n`` runs, round-robin over ``agents``, each waited until done; oldest first."""
    runs = [await t.submit(agents[i % len(agents)], f"{text}{i}") for i in range(n)]
    for r in runs:
        await t.wait_state(r["id"], "done")
    return runs


async def list_ids(t, params, key: str | None = None) -> list[str]:
    resp = await t.client.get("/v1/runs", params=params,
                              headers={"Authorization": f"Bearer {key or t.key}"})
    assert resp.status == 200, await resp.text()
    return [r["id"] for r in await resp.json()]


async def test_a_repeated_status_is_one_filter(start_tracker, sim):
    # each value was a branch of the merged query: a page of `limit` counted each run twice
    # and ran short, and ~500 repeats passed SQLite's compound SELECT limit (a 503)
    t = await start_tracker()
    agents = [sim.create_agent(f"s{i}")["id"] for i in range(3)]
    runs = [r["id"] for r in await finished_runs(t, agents, 6)]
    twice = [("statuses", "completed"), ("statuses", "completed")]
    assert await list_ids(t, [*twice, ("limit", "4")]) == runs[::-1][:4]
    assert await list_ids(t, [*twice, ("statuses", "failed"), ("limit", "4")]) == runs[::-1][:4]
    assert await list_ids(t, [("statuses", "failed")] * 502) == []
    from tracker.sqlite_queries import _filters
    from tracker.store import RunFilter

    # the same for states: each was a parameter in every branch of the merged query
    _, params = _filters(RunFilter(states=["done"] * 300))
    assert params == ["done"]


async def test_a_bound_past_year_9999_in_utc_bounds_every_run(start_tracker, sim, agent):
    """Its UTC form has a five-digit year, which sorted before every stored time: `created_
    before` it listed nothing, `created_after` it everything."""
    t = await start_tracker()
    run = await t.submit(agent, "now")
    far = "9999-12-31T23:59:59-01:00"
    assert await list_ids(t, [("created_before", far)]) == [run["id"]]
    assert await list_ids(t, [("created_after", far)]) == []


async def test_several_agent_ids_list_the_runs_of_each(start_tracker, sim):
    from tracker.store import RunFilter

    t = await start_tracker()
    a1, a2, a3 = (sim.create_agent(f"m{i}")["id"] for i in range(3))
    runs = await finished_runs(t, [a1, a2, a3], 6)
    failed = await t.submit(a2, "[[fail]] boom")
    await t.wait_state(failed["id"], "done")
    newest = [failed["id"], *(r["id"] for r in reversed(runs))]
    of_a1_a2 = [i for i in newest if i not in (runs[2]["id"], runs[5]["id"])]
    both = [("agent_ids", a1), ("agent_ids", a2)]
    assert await list_ids(t, both) == of_a1_a2
    assert await list_ids(t, [*both, ("agent_ids", a1)]) == of_a1_a2
    page = await list_ids(t, [*both, ("limit", "3")])
    assert page + await list_ids(t, [*both, ("after", page[-1])]) == of_a1_a2
    assert await list_ids(t, [*both, ("order", "asc")]) == of_a1_a2[::-1]
    assert await list_ids(t, [*both, ("statuses", "failed"), ("statuses", "completed"),
                              ("limit", "2")]) == of_a1_a2[:2]
    assert await list_ids(t, [*both, ("statuses", "failed")]) == [failed["id"]]
    # as in Letta, agent_id wins over agent_ids
    assert await list_ids(t, [*both, ("agent_id", a3)]) == [runs[5]["id"], runs[2]["id"]]
    # each agent (and status) is a page down its own index, merged: no scan of the table
    for statuses in ((), ("completed", "failed")):
        plan = " ".join(await t.svc.store.explain(RunFilter(agent_ids=[a1, a2],
                                                            statuses=statuses)))
        assert "SCAN runs" not in plan, plan
        assert plan.count(" INDEX runs_") == 2 * (len(statuses) or 1), plan
    too_many = [("agent_ids", f"agent-{i:08d}-0000-4000-8000-000000000000") for i in range(51)]
    resp = await t.client.get("/v1/runs", params=too_many,
                              headers={"Authorization": f"Bearer {t.key}"})
    assert resp.status == 422
    assert (await resp.json())["detail"][0]["loc"][:2] == ["query", "agent_ids"]


async def test_cursors_keep_both_bounds_and_a_gone_one_is_refused(start_tracker, sim, agent):
    t = await start_tracker()
    runs = [r["id"] for r in await finished_runs(t, [agent], 5)]
    assert await list_ids(t, {"after": runs[4], "before": runs[0]}) == runs[3:0:-1]
    assert await list_ids(t, {"after": runs[0], "before": runs[4], "order": "asc"}) == runs[1:4]
    assert await list_ids(t, {"after": runs[2], "before": runs[2]}) == []
    # the cursor's run pruned between pages: a 400 naming it, never page 1 again
    page = await list_ids(t, {"limit": 2})
    assert page == [runs[4], runs[3]]
    pruned = await t.svc.store.get_run(runs[4])
    assert (await t.svc.store.prune(pruned.recorded_at, 100))["runs"] == 4
    unknown = "run-00000000-0000-4000-8000-000000000000"
    other = await user_key(t, "dave")
    for params, key in (({"after": page[-1]}, None), ({"before": unknown}, None),
                        ({"after": runs[4]}, other)):
        resp = await t.get("/v1/runs", key=key, **params)
        assert resp.status == 400, params
        detail = (await resp.json())["detail"]
        assert [*params.values()][0] in detail and [*params][0] in detail, detail
    assert await list_ids(t, {"before": runs[4]}) == []


async def test_bad_parameters_get_422_naming_them(start_tracker, sim):
    t = await start_tracker()
    for params, name in (({"limit": "0"}, "limit"), ({"limit": "abc"}, "limit"),
                         ({"order": "sideways"}, "order"), ({"statuses": "done"}, "statuses"),
                         ({"created_after": "yesterday"}, "created_after"),
                         ({"bogus": "1"}, "bogus"), ({"active": "maybe"}, "active")):
        resp = await t.get("/v1/runs", **params)
        assert resp.status == 422, params
        assert (await resp.json())["detail"][0]["loc"][:2] == ["query", name]
    one = "/v1/runs/run-00000000-0000-4000-8000-000000000000"
    for params, name in (({"include": "messages"}, "include"), ({"bogus": "1"}, "bogus")):
        resp = await t.get(one, **params)
        assert resp.status == 422, params
        assert (await resp.json())["detail"][0]["loc"][:2] == ["query", name]
    assert (await t.get(one)).status == 404
    assert (await t.get("/v1/runs/nonsense/events")).status == 400  # no run id: Letta says so
    assert (await t.get(f"/v1/runs/run-{uuid.uuid4()}/events")).status == 404


async def test_a_messages_page_never_ends_inside_a_group_sharing_an_id(start_tracker, sim):
    """A legacy agent's reasoning and answer share one id (letta-samples'
    legacy_memgpt_v2_async__run_messages.json): a page cut between them was followed by
    `after=` that id, which skips past the whole group: the answer was never served. Letta's
    SDK pages so, and sends Letta's order_by."""
    import letta_client

    t = await start_tracker()
    agent = sim.create_agent("legacy", agent_type="memgpt_v2_agent")["id"]
    run = await t.submit(agent, "hello")
    await t.wait_state(run["id"], "done")
    path = f"/v1/runs/{run['id']}/messages"
    whole = await (await t.get(path)).json()
    ids = [m["id"] for m in whole]
    assert len(ids) == 3 and ids[1] == ids[2]  # user; reasoning and answer under one id
    assert await (await t.get(path, limit=2)).json() == whole
    assert await (await t.get(path, limit=1, order="desc", order_by="created_at")).json() == \
        whole[:0:-1]
    client = letta_client.AsyncLetta(base_url=str(t.client.make_url("")).rstrip("/"),
                                     api_key=t.key, max_retries=0)
    try:
        paged = [m.message_type async for m in client.runs.messages.list(run["id"], limit=1)]
    finally:
        await client.close()
    assert paged == [m["message_type"] for m in whole]


async def test_messages_pagination_and_timeline_alone_or_with_the_run(start_tracker, sim, agent):
    t = await start_tracker()
    run = await t.submit(agent, "page me")
    await t.wait_state(run["id"], "done")
    path = f"/v1/runs/{run['id']}/messages"
    every = await (await t.get(path)).json()
    assert len(every) == 2
    assert await (await t.get(path, limit=1)).json() == every[:1]
    assert await (await t.get(path, after=every[0]["id"])).json() == every[1:]
    assert await (await t.get(path, order="desc")).json() == every[::-1]
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    assert [(e["source"], e["kind"]) for e in events] == [
        ("api", "submit"), ("dispatch", "submitted"), ("callback", "completed")]
    # the run with its timeline in one request, by either id; Letta's shape unless asked
    plain = await t.run(run["id"])
    assert "events" not in plain
    for run_id in (run["id"], plain["tracker"]["letta_run_id"]):
        both = await (await t.get(f"/v1/runs/{run_id}", include="events")).json()
        assert both.pop("events") == events
        assert both == plain


async def test_cancel_queued_locally_and_all_active(start_tracker, sim, agent):
    t = await start_tracker()
    first = await t.submit(agent, "[[delay=1]] busy")
    queued = await t.submit(agent, "waits")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [queued["id"]]})
    assert await resp.json() == {queued["id"]: "cancelled"}
    gone = await t.run(queued["id"])
    assert gone["status"] == "cancelled" and gone["tracker"]["state"] == "cancelled"
    assert len(sim.received) == 1  # never sent
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", None)
    assert await resp.json() == {first["id"]: "cancelled"}
    await t.wait_state(first["id"], "done", timeout=10)
    await t.client.post(f"/v1/agents/{agent}/messages/cancel",
                        headers={"Authorization": f"Bearer {t.key}"})
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {})
    assert resp.status == 409
    assert (await resp.json())["detail"].startswith("CONFLICT: No active runs")


async def test_cancel_of_all_reaches_past_a_page_to_the_run_at_letta(start_tracker, sim,
                                                                     agent, monkeypatch):
    """Read as one page of the newest, a backlog longer than the page left out the oldest
    run, the one at Letta holding the lane: the answer looked whole, the lane stayed held."""
    monkeypatch.setattr(manager_module, "CANCEL_PAGE", 3)
    t = await start_tracker()
    stuck = await t.submit(agent, "[[never]] forever")
    backlog = [await t.submit(agent, f"waits {i}") for i in range(7)]
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", None)
    assert await resp.json() == {r["id"]: "cancelled" for r in [stuck, *backlog]}
    assert sim.store.get(stuck["tracker"]["letta_run_id"]).status == "cancelled"


async def test_cancel_with_a_body_that_is_no_object_cancels_nothing(start_tracker, sim,
                                                                    agent):
    t = await start_tracker()
    busy = await t.submit(agent, "[[delay=1]] busy")
    queued = await t.submit(agent, "waits")
    path = f"/v1/agents/{agent}/messages/cancel"
    for body in ([], 0, False, "", [queued["id"]], "all"):
        resp = await t.post(path, body)
        assert resp.status == 422, body
        assert (await resp.json())["detail"][0]["loc"] == ["body"], body
    assert (await t.run(queued["id"]))["tracker"]["state"] == "queued"
    assert (await t.run(busy["id"]))["status"] != "cancelled"
    # JSON null is no body, as in Letta (its cancel body defaults to None): every active run
    resp = await t.client.post(path, data=b"null", headers={
        "Authorization": f"Bearer {t.key}", "Content-Type": "application/json"})
    assert await resp.json() == {busy["id"]: "cancelled", queued["id"]: "cancelled"}


async def test_cancel_ignores_keys_letta_ignores(start_tracker, sim, agent):
    t = await start_tracker()
    await t.submit(agent, "[[delay=1]] busy")
    queued = await t.submit(agent, "waits")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel",
                        {"run_ids": [queued["id"]], "reason": "no longer needed"})
    assert resp.status == 200 and await resp.json() == {queued["id"]: "cancelled"}


async def test_a_malformed_run_id_is_lettas_400(start_tracker, sim):
    """An id that cannot be a run's gets Letta's 400, word for word, on every run route."""
    t = await start_tracker()
    expected = samples.body("get_run_malformed")
    for path in ("/v1/runs/not-a-run-id", "/v1/runs/not-a-run-id/messages",
                 "/v1/runs/not-a-run-id/events"):
        resp = await t.get(path)
        assert resp.status == 400 and await resp.json() == expected, path
    resp = await t.get(f"/v1/runs/run-{uuid.uuid4()}")
    assert resp.status == 404


async def test_stats(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    runs = [await t.submit(agent, f"s{i}") for i in range(3)]
    for r in runs:
        await t.wait_state(r["id"], "done")
    stats = await (await t.get("/v1/stats")).json()
    assert stats["total"] == 3 and stats["by_status"] == {"completed": 3}
    assert stats["by_agent"][agent]["state"] == {"done": 3}
    assert stats["completed_via"] == {"poll": 3} and stats["callback_share"] == 0.0
    assert stats["run_duration_s"]["count"] == 3 and stats["run_duration_s"]["p50"] > 0


def test_stats_percentiles_are_nearest_rank():
    """int(q·n) was a rank high where q·n is whole: of 1..10, p50 6 and p90 the max."""
    from tracker.stats import percentiles

    got = percentiles([float(i) for i in range(10, 0, -1)])
    assert (got["p50"], got["p90"], got["p99"], got["max"]) == (5.0, 9.0, 10.0, 10.0)
    hundred = percentiles([float(i) for i in range(1, 101)])
    assert (hundred["p50"], hundred["p99"]) == (50.0, 99.0)
    assert percentiles([7.0])["p50"] == 7.0


async def test_openapi_describes_every_route(start_tracker):
    t = await start_tracker()
    doc = await (await t.client.get("/openapi.json")).json()
    validate_openapi(doc)
    from tracker.api import ROUTES

    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path], route.path
    submit = doc["paths"]["/v1/agents/{agent_id}/messages/async"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/AsyncMessageRequest"}
    fields = doc["components"]["schemas"]["AsyncMessageRequest"]["properties"]
    assert {"messages", "input", "max_steps", "callback_url", "top_logprobs"} <= fields.keys()
    names = {p["name"] for p in doc["paths"]["/v1/runs"]["get"]["parameters"]}
    assert {"agent_id", "statuses", "before", "after", "state", "callback_missed"} <= names
    # cancel passes Letta's 4xx on, and a Letta down is its 503
    cancel = doc["paths"]["/v1/agents/{agent_id}/messages/cancel"]["post"]["responses"]
    assert "4XX" in cancel and "Letta" in cancel["503"]["description"]


async def test_relay_state_is_shown_for_one_run_and_never_guessed(start_tracker, sim, agent,
                                                                  aiohttp_server):
    from aiohttp import web

    async def hook(request):
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    t = await start_tracker()
    run = await t.submit(agent, "relay", callback_url=str(receiver.make_url("/hook")))
    await t.wait_state(run["id"], "done")

    async def delivered():
        return (await t.run(run["id"]))["tracker"]["relay"] == "delivered"

    await eventually(delivered)
    [listed] = await (await t.get("/v1/runs")).json()
    assert listed["tracker"]["relay"] is None  # listings do not look it up


async def test_answers_are_utf8_json_and_keep_any_text(start_tracker, sim, agent):
    t = await start_tracker()
    text = 'héllo ✓ 日本 "quoted" \\ back\tslash \U0001F600 \u2028'
    run = await t.submit(agent, text)
    await t.wait_state(run["id"], "done")
    for path in ("/v1/runs", f"/v1/runs/{run['id']}", f"/v1/runs/{run['id']}/messages"):
        resp = await t.get(path)
        assert resp.content_type == "application/json" and resp.charset == "utf-8", path
        raw = await resp.read()
        assert json.loads(raw.decode("utf-8")) == await resp.json(), path
    # the user's text comes back intact, whatever its characters (the simulator echoes it)
    messages = await (await t.get(f"/v1/runs/{run['id']}/messages")).json()
    assert any(text in node.values() for node in walk(messages)), messages


def test_what_orjson_refuses_is_still_answered_as_json():
    # Letta's own answers may hold what orjson will not encode (read back from Letta's JSON)
    data = {"big": 2**70, "half": "a \ud800 pair", "text": "héllo"}
    resp = json_response(data)
    assert (resp.status, resp.charset) == (200, "utf-8")
    assert json.loads(resp.body.decode("utf-8")) == data
