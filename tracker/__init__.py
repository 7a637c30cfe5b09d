"""tracker: every message reaches its Letta agent exactly once, and every result is recorded."""

__version__ = "0.1.0"
