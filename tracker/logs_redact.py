"""Redaction: no secret ever reaches a log line.

Secrets are masked as ``***`` in the whole formatted line (message, extras, traceback), after
the formatter has run, because a traceback is rendered only at format time and the JSON
formatter renders its own: a filter on the record would miss both. Two kinds are masked:
values registered at start-up (the Letta API key, the callback secret), and anything shaped
like a secret the tracker hands out or receives (``tk_`` keys, ``whsec_`` webhook secrets,
bearer tokens, the MAC in a callback URL), whoever logged it.
"""

from __future__ import annotations

import json
import logging
import re

MASK = "***"
#: registered values shorter than this are not masked: they would blank ordinary words
MIN_LEN = 6
#: (text that every match contains, in lower case; the pattern; its replacement). Most lines
#: hold none of these texts, and a substring test rules a pattern out for a fraction of a scan.
PATTERNS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("tk_", re.compile(r"tk_[A-Za-z0-9_-]{20,}"), MASK),
    ("whsec_", re.compile(r"whsec_[A-Za-z0-9+/=]{20,}"), MASK),
    # an Authorization header, whatever its token looks like
    ("bearer", re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1" + MASK),
    ("x-api-key", re.compile(r"(?i)(x-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
     r"\1" + MASK),
    # a callback URL's token is a per-run credential: keep the run id, mask the MAC
    ("run-", re.compile(r"(run-[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12})\.[A-Za-z0-9_-]{32}"),
     r"\1." + MASK),
)


class Redactor:
    """Masks registered secret values and secret-shaped tokens in text."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._known: re.Pattern[str] | None = None

    def register(self, *values: str | None) -> None:
        """Mask these exact values from now on (empty and very short values are ignored)."""
        for value in values:
            if value and len(value) >= MIN_LEN:
                # the JSON formatter escapes quotes and backslashes: mask that spelling too
                self._values.update({value, json.dumps(value)[1:-1]})
        if self._values:
            longest_first = sorted(self._values, key=len, reverse=True)
            self._known = re.compile("|".join(map(re.escape, longest_first)))

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        if self._known is not None and any(value in text for value in self._values):
            text = self._known.sub(MASK, text)
        # a needle in lower case is in the lowered text whenever a match is in the text, as long
        # as the text is ASCII (IGNORECASE matches the Kelvin sign to "k"): other text goes
        # through every pattern. A search is cheaper than a sub that finds nothing.
        lower = text.lower() if text.isascii() else None
        for needle, pattern, replacement in PATTERNS:
            if (lower is None or needle in lower) and pattern.search(text):
                text = pattern.sub(replacement, text)
        return text


class RedactingFormatter(logging.Formatter):
    """Formats with the wrapped formatter, then masks secrets in the finished line."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor) -> None:
        super().__init__()
        self.inner = inner
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(self.inner.format(record))


#: the process's redactor: ``logs.setup`` installs it, start-up registers the secrets
REDACTOR = Redactor()


def register(*values: str | None) -> None:
    """Mask these values in every log line from now on."""
    REDACTOR.register(*values)


def install(handler: logging.Handler, redactor: Redactor = REDACTOR) -> None:
    """Make ``handler`` mask secrets in every line it writes (wraps its formatter)."""
    inner = handler.formatter or logging.Formatter()
    if not isinstance(inner, RedactingFormatter):
        handler.setFormatter(RedactingFormatter(inner, redactor))
