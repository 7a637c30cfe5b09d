"""Schemathesis against the running tracker's own /openapi.json, with a valid key: no 5xx, and
every response (errors included) matches the status codes and schemas the document declares.

Both kinds of input are generated: positive (bodies and parameters the schema allows, sent to a
real agent and real runs as well as to made-up ones) and negative (ones it forbids).
"""

from __future__ import annotations

import asyncio
import os
import traceback

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
#: headers that frame the HTTP message, not API input: a generated `transfer-encoding` beside
#: the body's length is refused by aiohttp's parser (request smuggling), before the
#: application, with its own text/plain 400
FRAMING = {"transfer-encoding", "content-length", "connection", "host", "te", "upgrade",
           "expect"}


def fuzz(url: str, key: str, fixed: dict[str, str], paths: set[str] | None,
         skip: set[str]) -> list[str]:
    """Run the operations (those under ``paths``, else all but ``skip``) in both modes; the
    failures, one text each."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if (paths is not None and op.path not in paths) or op.path in skip:
            continue
        own = {k: v for k, v in fixed.items() if "{" + k + "}" in op.path}
        variants = [(mode, None) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        if own:  # the same, on a real agent and a real run
            variants += [(GenerationMode.POSITIVE, own), (GenerationMode.NEGATIVE, own)]
        for mode, path_parameters in variants:
            label = f"{op.method.upper()} {op.path} {mode.value} {path_parameters or ''}"
            try:
                run_operation(op, mode, path_parameters, url, key)
            except Unsatisfiable:
                continue  # nothing to make invalid (no parameters, no body)
            # one operation's failure must not hide the others'
            except (Exception, BaseExceptionGroup) as e:
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:1500]}")
                traceback.clear_frames(e.__traceback__)
    return failures


def run_operation(op, mode, path_parameters, url: str, key: str) -> None:
    strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        for name in [h for h in case.headers or {} if h.lower() in FRAMING]:
            del case.headers[name]
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"},
                             timeout=15)
        case.validate_response(response, checks=CHECKS)

    check()


METRICS = {"/metrics"}


@pytest.mark.parametrize("paths, skip", [
    pytest.param(None, METRICS, id="api"),
    pytest.param(METRICS, set(), id="metrics"),
])
async def test_schemathesis_no_5xx_and_responses_match_the_schema(procs, paths, skip):
    sim = await procs.simulator(agents=2, run_duration=(0.01, 0.05))
    tracker = procs.tracker(sim, env={"TRACKER_RELAY__ALLOW_PRIVATE": "false"})
    key = await tracker.create_key()
    await tracker.start()
    client = procs.client(tracker, key)
    agent = sim.agents[0]
    status, run = await client.submit(agent, "seed", "seed-otid")
    assert status == 200, run
    fixed = {"agent_id": agent, "run_id": run["id"]}
    failures = await asyncio.to_thread(fuzz, tracker.url, key, fixed, paths, skip)
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in tracker.log_text()
