"""Redaction: secrets never reach a log line, in text or JSON, message, extras or traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker import logs
from tracker.logs_redact import MASK, PATTERNS, RedactingFormatter, Redactor, install

LETTA_KEY = "sk-let-0123456789abcdef"
CALLBACK_SECRET = "cb-secret-Zm9vYmFyYmF6cXV4"
TRACKER_KEY = "tk_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"
WEBHOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
RUN = "run-5ba2cc7c-8cbf-4f37-8066-eda14a61a538"
CALLBACK_URL = f"http://t/callbacks/letta/{RUN}.AAAAbbbbCCCCddddEEEEffffGGGGhhhh"
SECRETS = (LETTA_KEY, CALLBACK_SECRET, TRACKER_KEY, WEBHOOK_SECRET, "AAAAbbbbCCCCdddd")


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger writing through ``logs``' own formatter, redaction installed as proposed."""
    redactor = Redactor()
    redactor.register(LETTA_KEY, CALLBACK_SECRET, "", None)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter(
        "%(levelname)s %(name)s: %(message)s"))
    install(handler, redactor)
    logger = logging.getLogger(f"test.redact.{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, buf


def log_everything(logger: logging.Logger) -> None:
    logger.info("calling Letta with Authorization: Bearer %s", LETTA_KEY)
    logger.info("headers %r", {"Authorization": f"Bearer {TRACKER_KEY}", "X-API-Key": "abc12345"})
    logger.warning("webhook secret rotated to %s", WEBHOOK_SECRET, extra={"run_id": RUN,
                                                                          "agent_id": "agent-1"})
    logger.info("callback url %s", CALLBACK_URL, extra={"status": CALLBACK_SECRET})
    try:
        raise RuntimeError(f"signing failed with secret {CALLBACK_SECRET}")
    except RuntimeError:
        logger.exception("relay error for key %s", TRACKER_KEY)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_reaches_the_line(fmt):
    logger, buf = capture(fmt)
    log_everything(logger)
    out = buf.getvalue()
    for secret in (*SECRETS, "abc12345"):
        assert secret not in out
    assert out.count(MASK) >= 8
    assert "Traceback" in out and "RuntimeError" in out  # the traceback is kept, masked
    assert f"{RUN}.{MASK}" in out  # the run id in a callback URL stays readable
    assert "agent-1" in out


def test_json_lines_stay_valid_json():
    logger, buf = capture("json")
    log_everything(logger)
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    assert len(lines) == 5
    assert lines[2]["run_id"] == RUN and lines[2]["msg"] == f"webhook secret rotated to {MASK}"
    assert lines[3]["status"] == MASK
    assert CALLBACK_SECRET not in lines[4]["exc"] and MASK in lines[4]["exc"]


def test_a_secret_the_json_formatter_escapes_is_masked_too():
    odd = 'pa"ss\\word-123'
    redactor = Redactor()
    redactor.register(odd)
    line = json.dumps({"msg": f"using {odd}"})
    assert redactor.redact(line) == json.dumps({"msg": f"using {MASK}"})


def test_short_values_and_ordinary_text_are_left_alone():
    redactor = Redactor()
    redactor.register("abc", "")
    text = "run queued abc; tk_short; prefix tk_abcdefg; the bearer of news"
    assert redactor.redact(text) == text


def test_install_is_idempotent_and_keeps_the_inner_formatter():
    handler = logging.StreamHandler(io.StringIO())
    inner = logs.JsonFormatter()
    handler.setFormatter(inner)
    install(handler)
    install(handler)
    assert isinstance(handler.formatter, RedactingFormatter)
    assert handler.formatter.inner is inner


def test_the_proposed_setup_wiring_masks_the_root_handler(capsys):
    """``logs.setup`` then ``install`` on its handler, as the proposed edit does."""
    from tracker import logs_redact

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("INFO", "json")
        logs_redact.install(root.handlers[0])
        logs_redact.register(LETTA_KEY)
        logging.getLogger("tracker.letta").info("key is %s", LETTA_KEY, extra={"run_id": RUN})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == f"key is {MASK}" and line["run_id"] == RUN


def _every_pattern(redactor: Redactor, text: str) -> str:
    """The redaction with no shortcut: every registered value and every pattern, always."""
    if redactor._known is not None:
        text = redactor._known.sub(MASK, text)
    for _, pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


#: what IGNORECASE takes for a letter: both cases, and beyond ASCII the dotted capital I, the
#: Kelvin sign and the long s
_CASES = {"i": "iI\u0130", "k": "kK\u212a", "s": "sS\u017f"}


def _spelled(word: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from(_CASES.get(c, c + c.upper())) for c in word)).map("".join)


_SECRETISH = st.one_of(
    _spelled("bearer").map(lambda w: w + " AAAAbbbbCCCCdddd"),
    _spelled("x-api-key").map(lambda w: w + ": abc12345"),
    st.sampled_from([TRACKER_KEY, WEBHOOK_SECRET, CALLBACK_URL, LETTA_KEY, CALLBACK_SECRET]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_SECRETISH, st.text(max_size=6)), max_size=6).map("".join))
def test_the_shortcuts_mask_exactly_what_every_pattern_masks(text):
    # redact() skips a pattern whose needle a line lacks: it must never skip a secret
    redactor = Redactor()
    redactor.register(LETTA_KEY, CALLBACK_SECRET)
    assert redactor.redact(text) == _every_pattern(redactor, text)
