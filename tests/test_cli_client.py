"""Acceptance: the real ``tracker submit`` and ``tracker runs`` commands, in a subprocess,
against a tracker and the simulator served on real ports by this test."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually

REPO = Path(__file__).resolve().parents[1]
REPLY = "Hello from fake LLM."


class Result:
    """What one CLI call printed, and its exit code."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


async def cli(*args: str, url: str | None = None, key: str | None = None,
              env: dict[str, str] | None = None) -> Result:
    """Run ``python -m tracker ARGS`` without blocking the loop that serves the tracker."""
    # piped, as here, tables are 200 columns wide unless COLUMNS says otherwise (pytest-xdist's
    # workers set it to 80)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("TRACKER_") and k not in ("COLUMNS", "LINES")}
    clean.update({"TRACKER_URL": url} if url else {})
    clean.update({"TRACKER_API_KEY": key} if key else {})
    clean.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", *args, cwd=REPO, env=clean,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def tracker(start_tracker):
    return await start_tracker()


@pytest.fixture
def url(tracker) -> str:
    return str(tracker.client.make_url("/")).rstrip("/")


async def test_submit_wait_prints_the_reply(tracker, url, agent):
    r = await cli("submit", agent, "hello there", "--wait", url=url, key=tracker.key)
    assert r.code == 0, r.err
    assert REPLY in r.out
    assert "completed" in r.out


async def test_submit_json_is_the_run(tracker, url, agent):
    r = await cli("submit", agent, "hi", "--json", url=url, key=tracker.key)
    assert r.code == 0, r.err
    run = json.loads(r.out)
    assert run["id"].startswith("run-")
    assert run["tracker"]["state"] in ("queued", "submitting", "submitted", "done")
    await tracker.wait_state(run["id"], "done")


async def test_submit_wait_json_has_the_messages(tracker, url, agent):
    r = await cli("submit", agent, "hi", "--wait", "--json", url=url, key=tracker.key)
    assert r.code == 0, r.err
    run = json.loads(r.out)
    assert run["tracker"]["state"] == "done"
    replies = [m["content"] for m in run["messages"] if m["message_type"] == "assistant_message"]
    assert replies == [REPLY]


async def test_the_clients_messages_are_every_page_of_them(start_tracker, sim, agent,
                                                             monkeypatch):
    """``submit --wait`` printed the first page's 100 messages only: a long run's reply,
    its last message, was left out."""
    from tests.test_completion import _long_result
    from tracker import api_client

    sim.set_faults(callback_drop=1.0)  # a poll reads the result whole
    t = await start_tracker(polling={"grace_s": 1.0})
    run = await t.submit(agent, "[[delay=0.1]] a long one")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    messages = _long_result(sim, letta_id, 150)
    await t.wait_state(run["id"], "done")
    monkeypatch.setattr(api_client, "MESSAGES_PAGE", 40)  # several pages, the last short
    url = str(t.client.make_url("/")).rstrip("/")
    async with api_client.TrackerClient(url, t.key) as client:
        got = await client.messages(run["id"])
    assert len(got) == len(messages) == 152
    assert got[-1]["content"] == messages[-1]["content"] == REPLY


async def test_waiting_outlasts_a_tracker_that_cannot_answer_for_a_moment(
        tracker, url, agent, monkeypatch):
    """A look that failed while the run went on (the tracker restarting, a 503) ended
    ``submit --wait`` with exit 1, "ended otherwise"; it is waited out. A refusal is not."""
    from tracker import cli_client
    from tracker.api_client import ApiError, TrackerClient

    monkeypatch.setattr(cli_client, "POLL_EVERY", 0.05)
    async with TrackerClient(url, tracker.key) as client:
        run = await client.submit(agent, "[[delay=0.5]] hi")
        real, failures = client.run, []

        async def flaky(run_id):
            if len(failures) < 3:
                failures.append(run_id)
                raise ApiError("no tracker at ... (is `tracker serve` running?)", passing=True)
            return await real(run_id)

        client.run = flaky
        done = await cli_client.follow(client, run, timeout=10, quiet=True)
        assert done["tracker"]["state"] == "done" and len(failures) == 3

        async def refused(run_id):
            raise ApiError("401 Unauthorized — the API key was refused")

        client.run = refused
        with pytest.raises(ApiError, match="401"):
            await cli_client.follow(client, run, timeout=10, quiet=True)


async def test_runs_list_table_and_json(tracker, url, agent):
    run = await tracker.submit(agent)
    await tracker.wait_state(run["id"], "done")
    table = await cli("runs", "list", url=url, key=tracker.key)
    assert table.code == 0, table.err
    assert run["id"] in table.out
    assert "learnt via" in table.out
    listed = await cli("runs", "list", "--json", "--state", "done", "--agent-id", agent,
                       url=url, key=tracker.key)
    assert listed.code == 0, listed.err
    assert [r["id"] for r in json.loads(listed.out)] == [run["id"]]


async def test_runs_list_fits_an_80_column_terminal(tracker, url, agent):
    # columns are left out, the least wanted first, rather than every cell cut to a letter
    run = await tracker.submit(agent)
    await tracker.wait_state(run["id"], "done")
    narrow = await cli("runs", "list", url=url, key=tracker.key, env={"COLUMNS": "80"})
    assert narrow.code == 0, narrow.err
    assert max(len(line) for line in narrow.out.splitlines()) <= 80
    row = next(line for line in narrow.out.splitlines() if run["id"] in line)
    assert row.split()[1:-1:2] == [run["id"], "completed", "done", "callback"]
    wide = await cli("runs", "list", url=url, key=tracker.key, env={"COLUMNS": "160"})
    assert agent in wide.out and "polls" in wide.out


async def test_runs_list_filters_reach_the_api(tracker, url, agent):
    run = await tracker.submit(agent)
    await tracker.wait_state(run["id"], "done")
    r = await cli("runs", "list", "--state", "queued", "--status", "running", url=url,
                  key=tracker.key)
    assert r.code == 0, r.err
    assert "no runs match" in r.out


async def test_runs_show_prints_the_timeline(tracker, url, agent):
    run = await tracker.submit(agent)
    await tracker.wait_state(run["id"], "done")
    r = await cli("runs", "show", run["id"], url=url, key=tracker.key)
    assert r.code == 0, r.err
    assert "timeline" in r.out
    for kind in ("submit", "submitted", "completed"):
        assert f" {kind} " in r.out
    shown = json.loads((await cli("runs", "show", run["id"], "--json", url=url,
                                  key=tracker.key)).out)
    assert shown["run"]["id"] == run["id"]
    assert [e["kind"] for e in shown["events"]][:2] == ["submit", "submitted"]


async def test_key_flag_wins_over_the_environment(tracker, url):
    r = await cli("runs", "list", "--key", tracker.key, url=url, key="tk-wrong")
    assert r.code == 0, r.err


async def test_bad_key_is_one_clear_line(tracker, url):
    """A key given and refused was answered with "set TRACKER_API_KEY or pass --key"."""
    r = await cli("runs", "list", url=url, key="tk-not-a-key")
    assert r.code == 1
    assert r.err == ("tracker: 401 Unauthorized — the API key from TRACKER_API_KEY was refused"
                     " (revoked, mistyped, or another tracker's)\n")
    r = await cli("runs", "list", "--key", "tk-not-a-key", url=url)
    assert r.code == 1 and "the API key from --key was refused" in r.err


async def test_no_key_says_how_to_give_one(tracker, url):
    r = await cli("runs", "list", url=url)
    assert r.code == 1
    assert r.err == "tracker: 401 Unauthorized — set TRACKER_API_KEY or pass --key\n"


async def test_unknown_run_and_unknown_agent(tracker, url):
    r = await cli("runs", "show", "run-00000000-0000-4000-8000-000000000000", url=url,
                  key=tracker.key)
    assert r.code == 1
    assert r.err.startswith("tracker: 404 Not Found: Run not found")
    r = await cli("submit", "agent-00000000-0000-4000-8000-000000000000", "hi", url=url,
                  key=tracker.key)
    assert r.code == 1
    assert r.err.startswith("tracker: 404")


async def test_no_tracker_at_the_url(unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}"
    r = await cli("runs", "list", url=url, key="tk-any")
    assert r.code == 1
    assert r.err.strip() == f"tracker: no tracker at {url} (is `tracker serve` running?)"


async def test_url_defaults_to_the_configured_server(tracker, agent):
    port = tracker.client.make_url("/").port
    r = await cli("runs", "list", "--json", key=tracker.key,
                  env={"TRACKER_SERVER__PORT": str(port)})
    assert r.code == 0, r.err
    assert json.loads(r.out) == []


async def test_submit_wait_shows_progress_then_the_failure(tracker, url, sim):
    from tracker.simulator import Faults

    failing = sim.create_agent("failing", faults=Faults(run_duration_s=(0.6, 0.6), fail_rate=1.0))
    r = await cli("submit", failing["id"], "hi", "--wait", url=url, key=tracker.key)
    assert r.code == 1
    assert "did not complete" in r.out
    # stderr is no terminal here: one plain status line per change, not a spinner
    assert "submitted / " in r.err


async def test_submit_wait_gives_up_at_its_timeout(start_tracker, agent):
    """A run stuck at Letta is checked for ever: ``--wait`` waited with it, for ever."""
    t = await start_tracker(polling={"deadline_s": 0.5})
    url = str(t.client.make_url("/")).rstrip("/")
    started = asyncio.get_running_loop().time()
    r = await cli("submit", agent, "[[never]] forever", "--wait", "--timeout", "2", url=url,
                  key=t.key)
    assert r.code == 124, r.err
    assert asyncio.get_running_loop().time() - started < 15
    line = r.err.splitlines()[-1]
    run_id = line.split(": ")[2].split()[0]
    assert (await t.run(run_id))["tracker"]["state"] == "stuck"
    assert line == (f"tracker: stopped waiting after 2 s: {run_id} is stuck (created);"
                    f" look at it later with: tracker runs show {run_id}")
    scripted = await cli("submit", agent, "[[never]] again", "--wait", "--json",
                         "--timeout", "0.5", url=url, key=t.key)
    assert scripted.code == 124, scripted.err
    queued = json.loads(scripted.out)  # behind the stuck run, which holds the agent's lane
    assert queued["tracker"]["state"] == "queued"
    assert f"{queued['id']} is queued" in scripted.err
    assert scripted.err.endswith(f"tracker runs show {queued['id']}\n")


async def test_submit_wait_says_why_the_run_is_still_queued(tracker, url, sim, agent):
    """Letta down: the status line said only "queued / created" for as long as it waited."""
    sim.set_faults(down=True)
    r = await cli("submit", agent, "hi", "--wait", "--timeout", "1.5", url=url, key=tracker.key)
    assert r.code == 124, r.err
    line = next(x for x in r.err.splitlines() if "queued / created" in x)
    assert "(retrying: Letta " in line and len(line) < 200, line


async def test_submit_timeout_is_checked_and_documented(tracker, url, agent):
    r = await cli("submit", agent, "hi", "--wait", "--timeout", "0", url=url, key=tracker.key)
    assert r.code == 2 and "must be a number of seconds above 0, not '0'" in r.err
    shown = await cli("submit", "--help")
    assert "--timeout SECONDS" in shown.out and "exit 124" in shown.out
    assert "(600)" in shown.out


async def test_submit_wait_says_it_is_confirming_a_cancel(start_tracker, agent):
    # a step that never ends: the cancel is final at the run's deadline
    t = await start_tracker(polling={"cancel_confirm_s": 2.0, "deadline_s": 2.5})
    url = str(t.client.make_url("/")).rstrip("/")
    waiting = asyncio.create_task(cli("submit", agent, "[[never]] forever", "--wait", url=url,
                                      key=t.key))

    async def submitted() -> list:
        return await (await t.get("/v1/runs", state="submitted")).json()

    await eventually(submitted)
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel")  # every active run of it
    assert list((await resp.json()).values()) == ["cancelled"]
    r = await waiting
    assert r.code == 1, r.err
    assert r.err.count("confirming the cancel with Letta") == 1, r.err


async def test_a_tracker_url_without_its_scheme_or_a_lone_timeout_is_refused_first():
    """`--url localhost:8080` failed with "cannot talk to the tracker at localhost:8080:
    localhost:8080/v1/agents/..."; `--timeout` without `--wait` was silently ignored."""
    r = await cli("runs", "list", "--url", "localhost:8080", key="tk-any")
    assert r.code == 2 and r.err == ("tracker: the tracker URL 'localhost:8080' must be an"
                                     " http:// or https:// URL, like http://host:port\n")
    r = await cli("submit", "agent-x", "hi", "--timeout", "5", url="http://127.0.0.1:9",
                  key="tk-any")
    assert r.code == 2 and "--timeout goes with --wait" in r.err
