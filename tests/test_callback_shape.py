"""Filing checks a callback with ``LettaCallbackShape``, the applier parses it with
``LettaCallback``: a document one accepts and the other refuses would be answered 200 and then
never applied, or refused although it is Letta's. They must agree on every document."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import samples
from tracker.callbacks import parse_callback
from tracker.errors import TrackerError
from tracker.models import LettaCallback, LettaCallbackShape

RECORDED = [samples.body(n) for n in ("async_basic__callback", "llm_error_500__callback",
                                      "cancel_during_slow_llm__callback")]
#: where a mutation lands: every field either model types, and a key neither knows
PATHS = [("run_id",), ("status",), ("completed_at",), ("metadata",), ("metadata", "result"),
         ("metadata", "error"), ("metadata", "result", "messages"),
         ("metadata", "result", "messages", 0), ("metadata", "result", "messages", 0, "content"),
         ("metadata", "result", "stop_reason"), ("metadata", "result", "usage"),
         ("metadata", "result", "extra"), ("extra",)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["completed", "failed", "run-0123abcd-ef", "2026-01-02T03:04:05",
                       "2026-13-45T99:00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


def holds(doc: Any, key: Any) -> bool:
    return (key in doc if isinstance(doc, dict)
            else isinstance(doc, list) and isinstance(key, int) and key < len(doc))


def put(doc: Any, path: tuple, value: Any) -> None:
    *parents, last = path
    for key in parents:
        if not holds(doc, key):
            return  # an earlier mutation replaced the parent: nothing to put it in
        doc = doc[key]
    if isinstance(doc, dict) or holds(doc, last):
        doc[last] = value


@st.composite
def callbacks(draw) -> bytes:
    doc = copy.deepcopy(draw(st.sampled_from(RECORDED)))
    for path in draw(st.lists(st.sampled_from(PATHS), max_size=3)):
        if draw(st.booleans()):
            put(doc, path, draw(json_values))
        elif len(path) == 1 and isinstance(doc, dict):
            doc.pop(path[0], None)
    return json.dumps(doc).encode()


def verdict(raw: bytes, model: type) -> str:
    try:
        parse_callback(raw, model)
    except TrackerError as e:
        return str(e.status)
    return "ok"


def test_the_recorded_callbacks_pass_both():
    for doc in RECORDED:
        raw = json.dumps(doc).encode()
        assert verdict(raw, LettaCallbackShape) == verdict(raw, LettaCallback) == "ok"
        assert parse_callback(raw, LettaCallbackShape).run_id == doc["run_id"]


#: one at a time, every path with values of every kind, including the near misses
PLAUSIBLE = [None, 1, "x", "completed", "2026-01-02T03:04:05", "2026-13-45T99:00", [], [1],
             [{}], {}, {"stop_reason": "end_turn"}]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_each_field_wrong_in_each_way_gets_the_same_verdict(path):
    for value in PLAUSIBLE:
        doc = copy.deepcopy(RECORDED[0])
        put(doc, path, value)
        raw = json.dumps(doc).encode()
        assert verdict(raw, LettaCallbackShape) == verdict(raw, LettaCallback), (path, value)


@settings(max_examples=400, deadline=None)
@given(callbacks())
def test_the_shape_check_and_the_full_parse_agree(raw):
    assert verdict(raw, LettaCallbackShape) == verdict(raw, LettaCallback)


@pytest.mark.parametrize(("steps", "messages", "cut"), [
    (1, 2, False),     # a short run: its callback is whole
    (1, 100, True),    # 100 shown: there may be more
    (44, 50, False),   # fewer steps than 100 stored messages take
    (45, 50, True),    # steps enough to store 100, though fewer shown (a legacy agent's
                       # send_message: two stored, one shown)
])
def test_a_callback_perhaps_cut_by_letta_is_told_by_its_count_or_its_steps(
        steps, messages, cut):
    """Letta's callback carries the messages of the run's first 100 stored ones: a callback
    showing 100, or a run's with steps enough to store 100, may lack the last."""
    from tracker.applier import maybe_cut
    from tracker.manager import Observation

    raw = copy.deepcopy(samples.body("async_basic__callback"))
    result = raw["metadata"]["result"]
    result["messages"] = [result["messages"][-1]] * messages
    result["usage"]["step_count"] = steps
    parsed = parse_callback(json.dumps(raw).encode())
    assert maybe_cut(Observation.from_callback(parsed), parsed) is cut
