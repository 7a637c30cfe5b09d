"""Logging: one line per event, text or JSON, with run and agent ids where they apply."""

from __future__ import annotations

import json
import logging
import sys
import time

from tracker import logs_redact

EXTRA_KEYS = ("run_id", "agent_id", "letta_run_id", "source", "status")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={getattr(record, k)}" for k in EXTRA_KEYS if hasattr(record, k))
        return f"{line} {extras}" if extras else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        data.update({k: getattr(record, k) for k in EXTRA_KEYS if hasattr(record, k)})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.formatter.converter = time.gmtime
    logs_redact.install(handler)  # last: it wraps the formatter set above
    # neither format shows where a call was made, nor the thread or process: not gathered for
    # each record (the logging HOWTO's "Optimization"; a third of a line's cost)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
