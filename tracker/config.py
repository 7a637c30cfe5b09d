"""Configuration: TOML file, then ``TRACKER_<SECTION>__<KEY>`` environment overrides."""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tracker.errors import ConfigError

ENV_PREFIX = "TRACKER_"


#: the least length of a configured ``callbacks.secret``: it keys every callback URL's MAC,
#: and shorter ones are not masked in the logs (``logs_redact.MIN_LEN``); a generated one
#: has 43 characters
SECRET_MIN = 16


class Section(BaseModel):
    # TOML writes inf and nan: neither is a duration, a count or a schedule (a nan passed
    # every bound, and an inf keep_days overflowed the retention's date at each round)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def http_url(v: str, userinfo: str = "must not carry a user name or password") -> str:
    """``v`` checked as ``http(s)://host[:port][/path]``, without its trailing slash; a
    ValueError saying what is wrong, ``userinfo`` when it has ``user:password@``. Paths are
    appended to it, and a URL that merely starts right (``http://:8283``) failed later, at
    its first use, with a traceback."""
    try:
        parts = urlsplit(v)
        port = parts.port  # raises for a port that is no number, or out of range
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL, like http://host:port")
    if "@" in parts.netloc:
        raise ValueError(userinfo)
    if not parts.hostname:
        raise ValueError("has no host: http(s)://host[:port][/path]")
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("has an empty or zero port: http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ValueError("must have no query (?...) or fragment (#...): paths are appended")
    return v.rstrip("/")


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _public_url(v: str) -> str:
    """A ``public_url``: empty (derived from the server's address), or an http(s) URL."""
    return http_url(v) if v else v


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str = ""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    @field_validator("host")
    @classmethod
    def _some_host(cls, v: str) -> str:
        # "" resolves to nothing (serve could not listen) and made callback URLs http://:8080
        if not v:
            raise ValueError("must not be empty: 0.0.0.0 (or ::) listens on every interface")
        return v

    @field_validator("public_url")
    @classmethod
    def _public(cls, v: str) -> str:
        return _public_url(v)


class LettaConfig(Section):
    base_url: str = "http://localhost:8283"
    api_key: str = ""
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        # credentials in the URL were never sent to Letta, and were logged at start-up
        return http_url(v, "must not carry a user name or password: put Letta's key in"
                           " letta.api_key")


class DatabaseConfig(Section):
    url: str = "sqlite:///tracker.db"
    # NORMAL in WAL mode survives any process crash; FULL also survives power loss
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    @field_validator("url")
    @classmethod
    def _sqlite_url(cls, v: str) -> str:
        if not v.startswith("sqlite://"):
            raise ValueError("must be sqlite:///PATH (or sqlite:///:memory:), the only store")
        # an empty path (``sqlite:///$DB`` with DB unset) opened a database in memory: runs,
        # keys and all gone at every restart. In memory only when said so
        if not v.removeprefix("sqlite://").removeprefix("/"):
            raise ValueError("has no path: sqlite:///PATH (sqlite:///:memory: for a database"
                             " in memory, gone when the process ends)")
        return v


class CallbacksConfig(Section):
    secret: str = ""
    # while callbacks saturate the service, applying them waits (answering Letta comes
    # first); it resumes, flood or not, once the oldest unapplied one has waited this long
    apply_max_lag_s: float = Field(30.0, ge=0)
    # processes that take Letta's callbacks on a port of their own (0: the service's own
    # process takes them): answering a flood of callbacks then uses more than one core
    workers: int = Field(0, ge=0, le=64)
    # the port the workers share (0: the API port plus one)
    port: int = Field(0, ge=0, le=65535)
    # the base URL Letta reaches the workers at; "" = http://{server.host}:{port}
    public_url: str = ""
    # the largest callback body taken: Letta's carries up to 100 of a run's messages, a tool
    # return up to 50,000 characters (twice, in 0.16.8), far past a submit's max_body_bytes
    max_body_bytes: int = Field(67_108_864, ge=1024)

    @field_validator("public_url")
    @classmethod
    def _public(cls, v: str) -> str:
        return _public_url(v)

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, v: str) -> str:
        if v and len(v) < SECRET_MIN:
            raise ValueError(f"must be at least {SECRET_MIN} characters (or \"\": one is"
                             " generated and kept in the database)")
        return v


class PollingConfig(Section):
    grace_s: float = Field(2.0, ge=0)
    min_interval_s: float = Field(2.0, gt=0)
    max_interval_s: float = Field(300.0, gt=0)
    backoff: float = Field(1.5, ge=1.0)
    deadline_s: float = Field(3600.0, gt=0)
    concurrency: int = Field(8, ge=1)
    callback_wait_s: float = Field(1.0, ge=0)
    cancel_confirm_s: float = Field(30.0, ge=0)
    sweep_min: int = Field(3, ge=1)


class DispatchConfig(Section):
    per_agent: Literal["serial", "parallel"] = "serial"
    concurrency: int = Field(32, ge=1)
    retry_min_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(60.0, gt=0)
    inline_timeout_s: float = Field(10.0, gt=0)
    lookup_after_s: float = Field(30.0, ge=0)


class AuthConfig(Section):
    required: bool = True


class RelayConfig(Section):
    timeout_s: float = Field(15.0, gt=0)
    retry_schedule_s: list[float] = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    allow_private: bool = False

    @field_validator("retry_schedule_s")
    @classmethod
    def _schedule(cls, v: list[float]) -> list[float]:
        # one entry per attempt, the wait before it; the first goes as the outcome is
        # recorded (in its transaction's outbox row), so its entry must say so
        if not v or v[0] != 0 or min(v) < 0:
            raise ValueError("one delay per attempt, in seconds: the first 0 (the first attempt"
                             " goes at once), none negative")
        return v
    concurrency: int = Field(16, ge=1)
    per_destination: int = Field(4, ge=1)
    # one user's hung receivers (a few ports or names, each within per_destination) held
    # every slot, and every other user's deliveries waited
    per_user: int = Field(8, ge=1)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class RetentionConfig(Section):
    keep_days: float | None = Field(None, gt=0)
    interval_s: float = Field(3600.0, gt=0)
    batch_size: int = Field(500, ge=1)


class Config(Section):
    """The whole configuration; every key has a default."""

    server: ServerConfig = ServerConfig()
    letta: LettaConfig = LettaConfig()
    database: DatabaseConfig = DatabaseConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    polling: PollingConfig = PollingConfig()
    dispatch: DispatchConfig = DispatchConfig()
    auth: AuthConfig = AuthConfig()
    relay: RelayConfig = RelayConfig()
    logging: LoggingConfig = LoggingConfig()
    retention: RetentionConfig = RetentionConfig()

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Config:
        # inverted, the backoff between them had no meaning, and nothing said so
        for name, low, high in (("polling", "min_interval_s", "max_interval_s"),
                                ("dispatch", "retry_min_s", "retry_max_s")):
            section = getattr(self, name)
            if getattr(section, low) > getattr(section, high):
                raise ValueError(f"{name}.{low} ({getattr(section, low):g}) must not be"
                                 f" greater than {name}.{high} ({getattr(section, high):g})")
        return self

    @model_validator(mode="after")
    def _workers_reachable(self) -> Config:
        if not self.callbacks.workers:
            return self
        if self.database.url.removeprefix("sqlite://").removeprefix("/") in ("", ":memory:"):
            raise ValueError("callbacks.workers needs a database file: the workers share it")
        if not self.callbacks.port and not self.server.port:
            raise ValueError("callbacks.port is needed with callbacks.workers when "
                             "server.port is 0 (any free port)")
        if self.callback_port() > 65535:
            raise ValueError("callbacks.port is needed with callbacks.workers when server.port"
                             " is 65535: the workers' port would be server.port + 1")
        if self.callback_port() == self.server.port:
            raise ValueError("callbacks.port must differ from server.port: the callback "
                             "workers listen on a port of their own")
        if self.server.public_url and not self.callbacks.public_url:
            raise ValueError("callbacks.public_url is needed with callbacks.workers when "
                             "server.public_url is set: the URL Letta reaches the workers at")
        return self

    def public_base(self) -> str:
        """The base URL Letta uses to reach the API port."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        return f"http://{url_host(self.server.host)}:{self.server.port}"

    def callback_port(self) -> int:
        """The port the callback workers listen on (when there are any)."""
        return self.callbacks.port or self.server.port + 1

    def callback_base(self) -> str:
        """The base URL of the callback URLs handed to Letta: the workers' port when they
        take callbacks, else the API's (whose callback route serves the older URLs too)."""
        if not self.callbacks.workers:
            return self.public_base()
        if self.callbacks.public_url:
            return self.callbacks.public_url.rstrip("/")
        return f"http://{url_host(self.server.host)}:{self.callback_port()}"


def _env_value(raw: str) -> Any:
    # JSON first so lists, numbers and booleans work; anything else is a plain string
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" not in name:
            # a section's name and one underscore (TRACKER_POLLING_GRACE_S) was ignored in
            # silence; other TRACKER_ names (TRACKER_URL, TRACKER_API_KEY) are the CLI's
            section = next((sec for sec in Config.model_fields
                            if name[len(ENV_PREFIX):].lower().startswith(sec + "_")), None)
            if section:
                rest = name[len(ENV_PREFIX) + len(section) + 1:]
                raise ConfigError(f"environment variable {name}: a section and its key are"
                                  f" joined by two underscores: {ENV_PREFIX}"
                                  f"{section.upper()}__{rest}")
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        value = raw if key in ("api_key", "secret", "url", "base_url") else _env_value(raw)
        data.setdefault(section, {})[key] = value


def _first_error(err: ValidationError, origin: str) -> ConfigError:
    e = err.errors()[0]
    if not e["loc"]:  # a rule across keys: its message names them
        return ConfigError(f"invalid config ({origin}): {e['msg'].removeprefix('Value error, ')}")
    key = ".".join(str(p) for p in e["loc"])
    return ConfigError(f"invalid config key {key!r} ({origin}):"
                       f" {e['msg'].removeprefix('Value error, ')}")


#: hosts that mean every interface: no address another machine could reach
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warnings(cfg: Config) -> list[str]:
    """What the service should say at start-up of a configuration it runs with but which is
    likely not what was meant."""
    out = []
    if not cfg.auth.required and not _loopback(cfg.server.host):
        out.append(f"auth.required = false while listening on {cfg.server.host!r}: anyone who"
                   " reaches the port acts as an admin")
    if (urlsplit(cfg.callback_base()).hostname or "") in WILDCARD_HOSTS:
        out.append(f"Letta is handed callback URLs at {cfg.callback_base()}, which only a"
                   " Letta on this machine can reach: set server.public_url (and"
                   " callbacks.public_url with callback workers) to the address Letta reaches"
                   " this service at (a Letta elsewhere never calls back: its runs' outcomes"
                   " are learnt by polling)")
    return out


def checked(cfg: Config, origin: str = "command line") -> Config:
    """``cfg`` checked again as a whole, after changes made to it key by key."""
    try:
        return Config.model_validate(cfg.model_dump())
    except ValidationError as e:
        raise _first_error(e, origin) from None


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load config from an optional TOML file, then apply environment overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path:
        origin = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:  # not readable by this user, a directory
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    _apply_env(data, dict(os.environ if environ is None else environ))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, origin + " + environment") from None
