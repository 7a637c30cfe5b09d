"""Drop-in: the official letta-client SDK, pointed at the tracker, works unchanged."""

from __future__ import annotations

import pytest

letta_client = pytest.importorskip("letta_client")


@pytest.fixture
async def sdk(start_tracker):
    t = await start_tracker()
    client = letta_client.AsyncLetta(base_url=str(t.client.make_url("")).rstrip("/"),
                                     api_key=t.key, max_retries=0)
    yield t, client
    await client.close()


async def test_sdk_submit_retrieve_list_messages_usage_cancel(sdk, sim, agent):
    t, client = sdk
    run = await client.agents.messages.create_async(
        agent_id=agent, messages=[{"role": "user", "content": "hello sdk"}])
    assert run.id.startswith("run-") and run.status in ("created", "completed")
    await t.wait_state(run.id, "done")
    got = await client.runs.retrieve(run.id)
    assert got.id == run.id and got.status == "completed" and got.stop_reason == "end_turn"
    # the tracker's extras ride along as an extra field on Letta's Run type
    assert got.model_extra["tracker"]["state"] == "done"
    by_letta_id = await client.runs.retrieve(got.model_extra["tracker"]["letta_run_id"])
    assert by_letta_id.id == run.id

    listed = [r async for r in client.runs.list(agent_id=agent, statuses=["completed"], limit=5)]
    assert [r.id for r in listed] == [run.id]
    assert [r async for r in client.runs.list(agent_id=agent, statuses=["failed"])] == []

    messages = [m async for m in client.runs.messages.list(run.id)]
    assert [m.message_type for m in messages] == ["user_message", "assistant_message"]
    assert messages[1].content == "Hello from fake LLM."
    usage = await client.runs.usage.retrieve(run.id)
    assert usage.total_tokens and usage.total_tokens > 0

    slow = await client.agents.messages.create_async(agent_id=agent, input="[[delay=2]] slow")
    answer = await client.agents.messages.cancel(agent_id=agent, run_ids=[slow.id])
    # Letta's answer maps each run id to its outcome
    assert answer == {slow.id: "cancelled"} or answer.model_dump() == {slow.id: "cancelled"}


async def test_sdk_pages_through_history(sdk, sim, agent):
    t, client = sdk
    ids = [(await client.agents.messages.create_async(agent_id=agent, input=f"m{i}")).id
           for i in range(5)]
    for run_id in ids:
        await t.wait_state(run_id, "done")
    page = await client.runs.list(agent_id=agent, limit=2)
    seen = [r.id async for r in page]
    assert seen == list(reversed(ids))


async def test_sdk_sees_tracker_errors(sdk, sim):
    _, client = sdk
    with pytest.raises(letta_client.NotFoundError):
        await client.runs.retrieve("run-00000000-0000-4000-8000-000000000000")
    with pytest.raises(letta_client.NotFoundError):
        await client.agents.messages.create_async(
            agent_id="agent-00000000-0000-4000-8000-000000000000", input="x")
