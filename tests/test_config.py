"""Unit: the configuration's checks, and the URLs built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker import logs_redact
from tracker.cli import build_parser
from tracker.cli_client import tracker_url
from tracker.config import SECRET_MIN, load_config
from tracker.config import warnings as config_warnings
from tracker.errors import ConfigError


def refused(**env: str) -> str:
    """The one-line error ``env``'s config is refused with."""
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={f"TRACKER_{k}": v for k, v in env.items()})
    return e.value.detail


@pytest.mark.parametrize(("url", "says"), [
    ("http://:8283", "has no host"),
    ("http://letta:abc", "is not a valid URL (Port could not be cast"),
    ("http://letta:99999", "is not a valid URL (Port out of range"),
    ("http://letta:", "has an empty or zero port"),
    ("letta:8283", "must be an http:// or https:// URL"),
    ("http://letta:8283/?x=1", "must have no query"),
])
def test_letta_base_url_is_parsed_not_only_its_prefix(url: str, says: str):
    """``http://:8283`` passed and serve died at its first call to Letta, with a traceback."""
    detail = refused(LETTA__BASE_URL=url)
    assert detail.startswith("invalid config key 'letta.base_url' (defaults + environment): ")
    assert says in detail, detail


def test_letta_base_url_with_credentials_is_refused_without_echoing_them():
    """Credentials in the URL were never sent to Letta, and the start-up line logged them."""
    detail = refused(LETTA__BASE_URL="https://user:s3cret-pass@letta.example")
    assert "put Letta's key in letta.api_key" in detail
    assert "s3cret-pass" not in detail


def test_good_urls_are_kept_without_their_trailing_slash():
    cfg = load_config(None, environ={"TRACKER_LETTA__BASE_URL": "https://[::1]:8283/letta/",
                                     "TRACKER_SERVER__PUBLIC_URL": "https://t.example/base/"})
    assert cfg.letta.base_url == "https://[::1]:8283/letta"
    assert cfg.public_base() == "https://t.example/base"


@pytest.mark.parametrize("key", ["SERVER__PUBLIC_URL", "CALLBACKS__PUBLIC_URL"])
@pytest.mark.parametrize("url", ["tracker.example.com", "ftp://t.example", "http://:9000",
                                 "https://u:p@t.example"])
def test_public_urls_must_be_http_urls(key: str, url: str):
    """A public_url without a scheme was taken, and every callback URL Letta got with it."""
    detail = refused(**{key: url, "CALLBACKS__WORKERS": "1", "CALLBACKS__PORT": "9001"})
    assert f"'{key.lower().replace('__', '.')}'" in detail, detail


@pytest.mark.parametrize(("host", "base"), [("::1", "http://[::1]:8080"),
                                            ("::", "http://[::]:8080"),
                                            ("10.0.0.5", "http://10.0.0.5:8080")])
def test_callback_urls_put_ipv6_hosts_in_brackets(host: str, base: str):
    cfg = load_config(None, environ={"TRACKER_SERVER__HOST": host})
    assert cfg.public_base() == base


def test_callback_workers_urls_put_ipv6_hosts_in_brackets(tmp_path):
    cfg = load_config(None, environ={"TRACKER_SERVER__HOST": "::1",
                                     "TRACKER_CALLBACKS__WORKERS": "1",
                                     "TRACKER_DATABASE__URL": f"sqlite:///{tmp_path}/t.db"})
    assert cfg.callback_base() == "http://[::1]:8081"


def test_an_empty_server_host_is_refused():
    """``""`` made callback URLs ``http://:8080``, and serve could not listen on it."""
    assert "0.0.0.0 (or ::) listens on every interface" in refused(SERVER__HOST="")


@pytest.mark.parametrize(("host", "url"), [("::1", "http://[::1]:8080"),
                                           ("::", "http://[::1]:8080"),
                                           ("0.0.0.0", "http://127.0.0.1:8080")])
def test_cli_client_default_url_for_ipv6_and_every_interface(host: str, url: str):
    """``tracker runs list`` with server.host ``::1`` went to ``http://::1:8080``."""
    cfg = load_config(None, environ={"TRACKER_SERVER__HOST": host})
    args = build_parser().parse_args(["runs", "list"])
    assert tracker_url(cfg, args) == url


def test_a_short_callback_secret_is_refused():
    """Secrets under 6 characters were taken, and never masked in the logs."""
    detail = refused(CALLBACKS__SECRET="abc12")
    assert detail == ("invalid config key 'callbacks.secret' (defaults + environment): must be"
                      f' at least {SECRET_MIN} characters (or "": one is generated and kept in'
                      " the database)")
    assert "abc12" not in detail
    secret = "x" * SECRET_MIN  # the least taken is masked in the logs
    cfg = load_config(None, environ={"TRACKER_CALLBACKS__SECRET": secret})
    redactor = logs_redact.Redactor()
    redactor.register(cfg.callbacks.secret)
    assert redactor.redact(f"secret is {secret}") == "secret is ***"
    assert load_config(None, environ={}).callbacks.secret == ""  # generated at start


@pytest.mark.parametrize(("env", "says"), [
    ({"POLLING__MIN_INTERVAL_S": "400"},
     "polling.min_interval_s (400) must not be greater than polling.max_interval_s (300)"),
    ({"DISPATCH__RETRY_MIN_S": "5", "DISPATCH__RETRY_MAX_S": "2"},
     "dispatch.retry_min_s (5) must not be greater than dispatch.retry_max_s (2)"),
])
def test_inverted_bounds_are_refused_naming_the_keys(env: dict[str, str], says: str):
    assert refused(**env) == f"invalid config (defaults + environment): {says}"


def test_equal_bounds_are_taken():
    cfg = load_config(None, environ={"TRACKER_POLLING__MIN_INTERVAL_S": "5",
                                     "TRACKER_POLLING__MAX_INTERVAL_S": "5"})
    assert cfg.polling.min_interval_s == cfg.polling.max_interval_s == 5


def test_example_config_is_the_defaults():
    """config.example.toml lists every key with its default: it loads, and equals them."""
    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    assert load_config(example, environ={}) == load_config(None, environ={})


@pytest.mark.parametrize(("toml", "key"), [
    ("[relay]\nretry_schedule_s = [0, nan]\n", "relay.retry_schedule_s.1"),
    ("[retention]\nkeep_days = inf\n", "retention.keep_days"),
    ("[polling]\nmax_interval_s = inf\n", "polling.max_interval_s"),
])
def test_inf_and_nan_are_refused(tmp_path, toml: str, key: str):
    """TOML writes them: a nan passed every bound (``min`` of [0, nan] is 0), and an inf
    keep_days overflowed the retention's date at each of its rounds."""
    path = tmp_path / "cfg.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert f"invalid config key {key!r}" in e.value.detail


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_a_database_url_without_a_path_is_refused(url: str):
    """``sqlite:///$DB`` with DB unset ran on a database in memory: every run and key lost at
    each restart, a new admin key printed each time."""
    assert "has no path" in refused(DATABASE__URL=url)
    assert load_config(None, environ={"TRACKER_DATABASE__URL": "sqlite:///:memory:"})


def test_an_unreadable_config_file_is_one_line_not_a_traceback(tmp_path):
    for path, says in ((tmp_path, "cannot read config file"),
                       (tmp_path / "latin1.toml", "is not UTF-8 text")):
        if path != tmp_path:
            path.write_bytes(b"[server]\nhost = \"caf\xe9\"\n")
        with pytest.raises(ConfigError) as e:
            load_config(path, environ={})
        assert says in e.value.detail, e.value.detail


def test_workers_past_the_last_port_are_refused():
    assert "server.port + 1" in refused(SERVER__PORT="65535", CALLBACKS__WORKERS="2",
                                        DATABASE__URL="sqlite:///x.db")


@pytest.mark.parametrize(("env", "says"), [
    ({"AUTH__REQUIRED": "false", "SERVER__HOST": "0.0.0.0"}, "acts as an admin"),
    ({"SERVER__HOST": "0.0.0.0"}, "only a Letta on this machine can reach"),
    ({"SERVER__HOST": "::"}, "only a Letta on this machine can reach"),
])
def test_start_up_warns_of_a_configuration_likely_not_meant(env: dict[str, str], says: str):
    cfg = load_config(None, environ={f"TRACKER_{k}": v for k, v in env.items()})
    assert any(says in w for w in config_warnings(cfg)), config_warnings(cfg)


@pytest.mark.parametrize("env", [
    {},  # 127.0.0.1, auth required
    {"AUTH__REQUIRED": "false"},  # on loopback only
    {"SERVER__HOST": "0.0.0.0", "SERVER__PUBLIC_URL": "http://tracker.internal:8080"},
])
def test_no_warning_for_what_is_meant(env: dict[str, str]):
    cfg = load_config(None, environ={f"TRACKER_{k}": v for k, v in env.items()})
    assert config_warnings(cfg) == []


def test_an_environment_name_with_one_underscore_after_its_section_is_refused():
    """TRACKER_POLLING_GRACE_S (one underscore) was ignored in silence, the default in force;
    the CLI's own names (TRACKER_URL, TRACKER_API_KEY) are left alone."""
    assert refused(POLLING_GRACE_S="5") == (
        "environment variable TRACKER_POLLING_GRACE_S: a section and its key are joined by two"
        " underscores: TRACKER_POLLING__GRACE_S")
    assert load_config(None, environ={"TRACKER_URL": "http://x", "TRACKER_API_KEY": "tk_x",
                                      "TRACKER_SHARED_DIR": "/x"})
