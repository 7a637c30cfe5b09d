"""The real Letta server's recorded exchanges (letta-samples/) and a shape comparison.

The samples live beside the repository (`../shared/letta-samples`); set TRACKER_SHARED_DIR
to the directory holding `letta-samples/` to read them from elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

SHARED_DIR = Path(
    os.environ.get("TRACKER_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared"
)
SAMPLES_DIR = SHARED_DIR / "letta-samples"

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Classes of strings whose format matters; any other string is just "text".
_FORMATS = (
    ("timestamp with Z", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")),
    ("timestamp +00:00", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")),
    ("naive timestamp", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?$")),
    ("prefixed id", re.compile(rf"^([a-z]+)-{_UUID}$")),
    ("uuid", re.compile(rf"^{_UUID}$")),
)


@cache
def load(name: str) -> dict[str, Any]:
    """One recorded exchange (`name` without `.json`)."""
    return json.loads((SAMPLES_DIR / f"{name}.json").read_text())


def body(name: str) -> Any:
    """The recorded response body, or the JSON body of a recorded callback."""
    sample = load(name)
    return sample["body_json"] if "body_json" in sample else sample["body"]


def string_format(value: str) -> str:
    """The format class of a string: a timestamp style, an id kind, or plain text."""
    for label, pattern in _FORMATS:
        match = pattern.match(value)
        if match:
            return f"{match.group(1)} id" if label == "prefixed id" else label
    return "text"


def assert_same_shape(actual: Any, expected: Any, path: str = "$") -> None:
    """Same keys (in order), same JSON types, nulls where nulls, same string formats."""
    assert _kind(actual) == _kind(expected), f"{path}: {actual!r} vs sample {expected!r}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} vs {list(expected)}"
        for key, value in expected.items():
            assert_same_shape(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list) and expected:
        for i, item in enumerate(actual):
            assert_same_shape(item, expected[min(i, len(expected) - 1)], f"{path}[{i}]")
    elif isinstance(expected, str):
        got, want = string_format(actual), string_format(expected)
        assert got == want, f"{path}: {actual!r} is {got}, sample {expected!r} is {want}"


def _kind(value: Any) -> str:
    # bool before int: True is an int to isinstance
    for kind in (type(None), bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind.__name__
    return type(value).__name__
