"""Access: users cannot reach each other's runs by any route or filter; revoked keys stop at
once; keys are stored only hashed; no secret shows in logs or responses; the relay refuses
private destinations.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import eventually
from tests.reliability.harness import CALLBACK_SECRET, HOST
from tracker import auth
from tracker.callbacks import CallbackSigner

pytestmark = pytest.mark.slow


async def user_key(t, name: str, admin: bool = False) -> tuple[str, str]:
    user, key = await auth.create_key(t.svc.store, name, admin)
    return user.id, key


async def receiver(aiohttp_server, hits: list) -> str:
    """A webhook receiver on 127.0.0.1 that records every request it gets."""

    async def hook(request: web.Request) -> web.Response:
        hits.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hook)
    server = await aiohttp_server(app)
    return f"http://{HOST}:{server.port}"


async def test_users_cannot_read_list_count_or_cancel_each_others_runs(start_tracker, sim,
                                                                       agent, aiohttp_server):
    t = await start_tracker()
    hits: list = []
    hook = await receiver(aiohttp_server, hits) + "/hook"
    alice_id, alice = await user_key(t, "alice")
    bob_id, bob = await user_key(t, "bob")

    async def submit(key, text, **extra):
        resp = await t.post(f"/v1/agents/{agent}/messages/async", {"input": text, **extra},
                            key=key, headers={"Idempotency-Key": f"shared-{text}"})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    b1 = await t.wait_state((await submit(bob, "b1"))["id"], "done")
    a1 = await t.wait_state((await submit(alice, "a1", callback_url=hook))["id"], "done")
    b2 = await t.wait_state((await submit(bob, "b2"))["id"], "done")
    # bob's key with alice's Idempotency-Key value gets bob a run of his own, not alice's
    b_same = await submit(bob, "a1")
    assert b_same["id"] != a1["id"] and b_same["tracker"]["user_id"] == bob_id
    await t.wait_state(b_same["id"], "done")
    a_live = await submit(alice, "[[delay=3]] a-live")  # active while bob tries to cancel it
    await eventually(lambda: len(hits) >= 1)  # a1's delivery exists and was sent
    alice_refs = [a1["id"], a1["tracker"]["letta_run_id"], a_live["id"],
                  a_live["tracker"]["letta_run_id"]]
    for ref in alice_refs:
        for method, path in (("GET", ""), ("GET", "/messages"), ("GET", "/usage"),
                             ("GET", "/events"), ("GET", "/deliveries"),
                             ("POST", "/deliveries/redeliver")):
            headers = {"Authorization": f"Bearer {bob}"}
            resp = await t.client.request(method, f"/v1/runs/{ref}{path}", headers=headers)
            assert resp.status == 404, (method, path, ref, resp.status)
            assert alice_id not in await resp.text()
    bob_ids = {b1["id"], b2["id"], b_same["id"]}
    filters = [{}, {"agent_id": agent}, {"agent_ids": agent}, {"statuses": "completed"},
               {"statuses": "running"}, {"state": "done"}, {"state": "submitted"},
               {"active": "true"}, {"active": "false"}, {"completed_via": "callback"},
               {"callback_missed": "false"}, {"stop_reason": "end_turn"},
               {"created_after": "2000-01-01T00:00:00Z"}, {"order": "asc"}]
    for flt in filters:
        resp = await t.get("/v1/runs", key=bob, **flt)
        assert resp.status == 200, (flt, await resp.text())
        assert {r["id"] for r in await resp.json()} <= bob_ids, flt
    for flt in ({"user_id": alice_id}, {"user_id": alice_id, "agent_id": agent}):
        resp = await t.get("/v1/runs", key=bob, **flt)
        assert resp.status == 404 or await resp.json() == [], flt
    stats = await (await t.get("/v1/stats", key=bob)).json()
    assert stats["total"] == len(bob_ids), stats
    assert alice_id not in str(stats)
    # cancelling alice's runs, by either id, does nothing to them
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": alice_refs}, key=bob)
    assert resp.status == 200 and set((await resp.json()).values()) == {"failed"}
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {}, key=bob)
    assert resp.status == 409, await resp.text()  # bob has nothing active; alice's is not his
    assert (await t.run(a_live["id"]))["tracker"]["state"] == "submitted"
    final = await t.wait_state(a_live["id"], "done", timeout=10)
    assert final["status"] == "completed"
    assert len(sim.received) == 5
    # the admin sees everyone's
    everyone = {r["id"] for r in await (await t.get("/v1/runs")).json()}
    assert everyone == bob_ids | {a1["id"], a_live["id"]}


async def test_a_cursor_naming_another_users_run_tells_nothing(start_tracker, sim, agent):
    """`before`/`after` with someone else's run id must be answered as a cursor naming no
    run (a 400 that says so); otherwise the answer reveals that the run exists and when it
    was created."""
    t = await start_tracker()
    _, alice = await user_key(t, "alice")
    _, bob = await user_key(t, "bob")
    path = f"/v1/agents/{agent}/messages/async"
    await (await t.post(path, {"input": "b1"}, key=bob)).json()
    a1 = await (await t.post(path, {"input": "a1"}, key=alice)).json()
    b2 = await (await t.post(path, {"input": "b2"}, key=bob)).json()
    a1 = await t.wait_state(a1["id"], "done")
    await t.wait_state(b2["id"], "done")
    nobody = f"run-{uuid.uuid4()}"
    for cursor in ("after", "before"):
        for order in ("asc", "desc"):
            blind = await t.get("/v1/runs", key=bob, order=order, **{cursor: nobody})
            assert blind.status == 400
            blind_text = (await blind.text()).replace(nobody, "ID")
            for ref in (a1["id"], a1["tracker"]["letta_run_id"]):
                seen = await t.get("/v1/runs", key=bob, order=order, **{cursor: ref})
                assert seen.status == 400, (cursor, order, ref)
                assert (await seen.text()).replace(ref, "ID") == blind_text


async def test_metrics_do_not_count_other_users_runs(start_tracker, sim, agent):
    """/metrics needs no key: it must not tell anyone which agents have runs, or how many."""
    t = await start_tracker()
    _, alice = await user_key(t, "alice")
    sim.go_down()  # alice's runs stay queued on her agent
    for i in range(3):
        resp = await t.post(f"/v1/agents/{agent}/messages/async", {"input": f"q{i}"}, key=alice)
        assert resp.status == 200
    _, bob = await user_key(t, "bob")
    for headers in ({}, {"Authorization": f"Bearer {bob}"}):
        resp = await t.client.get("/metrics", headers=headers)
        if resp.status != 200:
            continue
        text = await resp.text()
        assert agent not in text, "another user's agent id and queue depth are public"
    sim.come_up()


async def test_revoked_key_stops_working_at_once(procs):
    sim = await procs.simulator(agents=1, run_duration=(0.01, 0.02))
    tracker = procs.tracker(sim)
    await tracker.create_key("admin")
    key = await tracker.create_key("carol", admin=False)
    await tracker.start()
    carol = procs.client(tracker, key)
    assert (await carol.request("GET", "/v1/runs"))[0] == 200
    answers: list[tuple[float, float, int]] = []
    stop = asyncio.Event()

    async def hammer():
        while not stop.is_set():
            started = time.monotonic()
            status, _ = await carol.request("GET", "/v1/runs")
            answers.append((started, time.monotonic(), status))

    workers = [asyncio.create_task(hammer()) for _ in range(4)]
    await asyncio.sleep(0.3)
    revoking_at = time.monotonic()
    await tracker.cli("keys", "revoke", key[:10])
    revoked_at = time.monotonic()  # the revoke is committed by now
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    before = [s for start, end, s in answers if end < revoking_at]
    after = [s for start, end, s in answers if start > revoked_at]
    assert before and set(before) == {200}
    assert after and set(after) == {401}, after
    status, body = await carol.submit(sim.agents[0], "x", "otid-after-revoke")
    assert status == 401 and body == {"detail": "Unauthorized"}
    assert (await sim.stats())["received"] == 0


LETTA_API_KEY = "sk-letta-reliability-0123456789abcdef"


async def test_no_secret_in_logs_responses_or_database(procs, aiohttp_server):
    """Keys are stored only as hashes; keys, the callback secret, the Letta API key, webhook
    secrets and per-run callback tokens never appear in a log line or a response."""
    hits: list = []
    hook = await receiver(aiohttp_server, hits) + "/hook"
    sim = await procs.simulator(agents=2, run_duration=(0.02, 0.1),
                                extra=["--api-key", LETTA_API_KEY, "--callback-drop", "0.5"])
    tracker = procs.tracker(sim, env={
        "TRACKER_LETTA__API_KEY": LETTA_API_KEY, "TRACKER_LOGGING__LEVEL": "DEBUG",
        "TRACKER_RELAY__ALLOW_PRIVATE": "true", "TRACKER_RELAY__RETRY_SCHEDULE_S": "[0, 0.2]"})
    admin_key = await tracker.create_key("admin")
    user_keys = [await tracker.create_key(f"user{i}", admin=False) for i in range(2)]
    await tracker.start()
    bodies: list[str] = []
    admin = procs.client(tracker, admin_key)
    users = [procs.client(tracker, k) for k in user_keys]

    async def call(client, method, path, **kw):
        status, body = await client.request(method, path, **kw)
        bodies.append(f"{method} {path} {status} {body}")
        return status, body

    run_ids = []
    for n, client in enumerate(users):
        for i in range(4):
            status, run = await call(client, "POST", f"/v1/agents/{sim.agents[n]}/messages/async",
                                     json_body={"input": f"hello {i}", "callback_url": hook})
            assert status == 200, run
            run_ids.append(run["id"])
    # refusals of every kind, each of which may log something
    await call(users[0], "GET", "/v1/runs", headers={"Authorization": "Bearer tk_" + "x" * 43})
    await call(users[0], "GET", f"/v1/runs/{run_ids[-1]}")
    await call(users[0], "POST", f"/v1/agents/{sim.agents[0]}/messages/async",
               json_body={"input": "x", "callback_url": "http://169.254.169.254/"})
    signer = CallbackSigner(CALLBACK_SECRET, tracker.url)
    async with aiohttp.ClientSession() as anon:
        for token, body in ((signer.token(run_ids[0]), {"run_id": "run-x", "status": "x"}),
                            (signer.token(run_ids[0])[:-3] + "abc", {}),
                            (signer.token(run_ids[1]), {"run_id": f"run-{uuid.uuid4()}",
                                                        "status": "completed",
                                                        "completed_at": "not a time"})):
            async with anon.post(f"{tracker.url}/callbacks/letta/{token}", json=body) as r:
                bodies.append(await r.text())
        for path in ("/healthz", "/metrics", "/openapi.json"):
            async with anon.get(tracker.url + path) as r:
                bodies.append(await r.text())
    for run_id in run_ids:
        for _ in range(100):
            status, run = await call(admin, "GET", f"/v1/runs/{run_id}")
            if run["tracker"]["state"] == "done":
                break
            await asyncio.sleep(0.1)
        for sub in ("/messages", "/usage", "/events", "/deliveries"):
            await call(admin, "GET", f"/v1/runs/{run_id}{sub}")
    await call(admin, "GET", "/v1/runs")
    await call(admin, "GET", "/v1/stats")
    await eventually(lambda: len(hits) >= len(run_ids), timeout=10)
    keys_list = await tracker.cli("keys", "list")
    await tracker.stop()
    db = sqlite3.connect(tracker.db)
    webhook_secrets = [s for row in db.execute(
        "SELECT webhook_secret, webhook_secret_old FROM users") for s in row if s]
    hashes = {row[0] for row in db.execute("SELECT key_hash FROM api_keys")}
    db.close()
    keys = [admin_key, *user_keys]
    assert hashes == {hashlib.sha256(k.encode()).hexdigest() for k in keys}
    macs = [signer.token(r).rsplit(".", 1)[1] for r in run_ids]
    secrets = {"API key": keys, "key without its prefix": [k[3:] for k in keys],
               "callback secret": [CALLBACK_SECRET], "Letta API key": [LETTA_API_KEY],
               "webhook secret": webhook_secrets + [s.removeprefix("whsec_")
                                                    for s in webhook_secrets],
               "callback token": macs}
    stored = b"".join(p.read_bytes() for p in tracker.db.parent.glob("t.db*"))
    places = {"log": tracker.log_text(), "responses": "\n".join(bodies),
              "keys list": keys_list, "database": stored.decode("latin-1"),
              "relay deliveries": "\n".join(f"{h} {b!r}" for _, h, b in hits)}
    assert "Authorization" in places["log"] or len(places["log"]) > 1000  # DEBUG ran
    # the database must hold the webhook secrets (it signs with them) and the callback tokens
    # (where Letta's runs name our URL); no response shows a token's MAC (Letta's callback
    # errors are kept masked)
    allowed = {("database", "webhook secret"), ("database", "callback token")}
    leaks = [(what, where) for what, values in secrets.items() for v in values
             for where, text in places.items() if v in text and (where, what) not in allowed]
    assert not leaks, leaks


async def test_relay_refuses_private_destinations(start_tracker, sim, agent, aiohttp_server):
    hits: list = []
    base = await receiver(aiohttp_server, hits)
    port = base.rsplit(":", 1)[1]
    t = await start_tracker(relay={"allow_private": False})
    path = f"/v1/agents/{agent}/messages/async"
    literal = [f"http://127.0.0.1:{port}/", f"http://[::1]:{port}/", "http://10.1.2.3/",
               "http://192.168.0.1/", "http://172.16.0.1/", "http://169.254.169.254/latest",
               "http://[fd00:ec2::254]/", "http://0.0.0.0/", f"http://[::ffff:127.0.0.1]:{port}/",
               "http://[::ffff:a01:203]/", "http://100.64.0.1/", "http://[fe80::1]/",
               "file:///etc/passwd", "gopher://127.0.0.1/", "http:///nohost"]
    for url in literal:
        resp = await t.post(path, {"input": "x", "callback_url": url})
        assert resp.status == 422, (url, await resp.text())
        assert (await resp.json())["detail"][0]["loc"] == ["body", "callback_url"], url
    assert await (await t.get("/v1/runs")).json() == [] and sim.received == []
    # names (and odd spellings) that lead to a private address are refused when dialled
    named = [f"http://localhost:{port}/hook", f"http://127.1:{port}/hook",
             f"http://2130706433:{port}/hook", f"http://0x7f000001:{port}/hook",
             f"http://LOCALHOST.:{port}/hook"]
    runs = []
    for url in named:
        resp = await t.post(path, {"input": "x", "callback_url": url})
        if resp.status == 422:
            continue  # refused at once: as good
        assert resp.status == 200, (url, await resp.text())
        runs.append((await resp.json())["id"])
    for run_id in runs:
        await t.wait_state(run_id, "done")

        async def failed(run_id=run_id):
            ds = await (await t.get(f"/v1/runs/{run_id}/deliveries")).json()
            return ds and ds[0]["state"] == "failed" and ds

        [delivery] = await eventually(failed, timeout=10)
        assert delivery["last_status"] is None, delivery  # never answered: never reached
    assert hits == []
