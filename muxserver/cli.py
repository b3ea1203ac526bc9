"""The ``muxserver`` command: options, environment, logging, signals, exit codes.

Every option can come from ``MUXSERVER_<OPTION>`` in the environment; the
command line wins. Exit status is part of the interface: 0 after a clean
shutdown, 2 for bad arguments (argparse's convention), 1 with one line on
stderr when the server cannot start. User errors never print a traceback.

The ready line ``muxserver listening on HOST:PORT`` is printed to stdout and
flushed exactly once, when the socket accepts: tools and tests wait for it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import ssl
import sys

from . import __version__
from .logs import setup_logging
from .monitor import Monitor
from .server import Config, Server
from .stats import StatsReporter

ENV_PREFIX = "MUXSERVER_"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be 0 or more")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _frame_size(text: str) -> int:
    value = int(text)
    if not 64 <= value <= 0xFFFFFFFF - 1024:
        raise ValueError("must be 64..4294966271 bytes")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of debug, info, warning, error, critical")
    return level


def _name(text: str) -> str:
    size = len(text.encode("utf-8"))
    if not 1 <= size <= 255:
        raise ValueError(f"must be 1..255 bytes of UTF-8 (this one is {size})")
    return text


def _metrics_port(text: str):
    """A port number, or "off" (the default: no monitoring port)."""
    if text.strip().lower() == "off":
        return "off"
    return _port(text)


def _log_format(text: str) -> str:
    fmt = text.lower()
    if fmt not in ("text", "json"):
        raise ValueError("must be text or json")
    return fmt


# (option, type, default, help). The table is the single source of truth for
# the parser, the environment variables and the README's options table.
OPTIONS = [
    ("host", str, "127.0.0.1", "address to listen on (use :: or 0.0.0.0 for all)"),
    ("port", _port, 7878, "TCP port; 0 picks a free one"),
    ("max-frame", _frame_size, 1048576, "largest frame a client may send, in bytes"),
    ("max-connections", _positive_int, 10000, "connections beyond this get ERROR LIMIT"),
    ("max-output", _positive_int, 8388608, "unsent bytes per connection before SLOW_CONSUMER"),
    ("max-rooms", _positive_int, 1000, "rooms one connection may be in"),
    (
        "max-input-memory",
        _positive_int,
        268435456,
        "bytes in incomplete frames over all connections; past it the largest is cut",
    ),
    ("frame-timeout", _seconds, 30.0, "seconds a frame that has started has to complete"),
    ("ping-interval", _seconds, 25.0, "seconds of client silence before the server PINGs"),
    ("ping-timeout", _seconds, 20.0, "further silence before IDLE_TIMEOUT"),
    ("drain-timeout", _seconds, 5.0, "grace period for closing connections and shutdown"),
    ("hello-timeout", _seconds, 10.0, "seconds a new connection has to complete HELLO"),
    ("name", _name, "muxserver", "server name announced in WELCOME"),
    ("token", str, "", "shared secret every HELLO must carry (empty: no auth)"),
    ("token-file", str, "", "read the token from this file (first line)"),
    ("rate-limit", _non_negative, 0.0, "EMITs per second per connection (0: off)"),
    ("rate-burst", _count, 0, "EMITs a connection may save up (0: same as --rate-limit)"),
    ("history-size", _count, 100, "messages of history per room (0: history off)"),
    ("history-bytes", _count, 1048576, "bytes of history per room"),
    ("history-ttl", _non_negative, 120.0, "seconds a message (and an empty room numbering) lives"),
    ("history-memory", _count, 67108864, "bytes of history for all rooms together"),
    ("resume-window", _non_negative, 120.0, "seconds a lost session can be resumed (0: off)"),
    ("tls-cert", str, "", "PEM certificate chain: serve TLS"),
    ("tls-key", str, "", "PEM private key for --tls-cert (if not in the same file)"),
    (
        "allowed-origins",
        str,
        "",
        "comma-separated origins a WebSocket upgrade may come from besides the server's own; * any",
    ),
    ("log-level", _log_level, "INFO", "debug, info, warning, error"),
    ("log-format", _log_format, "text", "text, or json: one JSON object per line"),
    ("stats-interval", _non_negative, 60.0, "seconds between summary log lines (0: off)"),
    (
        "metrics-port",
        _metrics_port,
        "off",
        "HTTP port for /metrics /healthz /connz /roomz; 0 picks a free one",
    ),
    ("metrics-host", str, "127.0.0.1", "address of the monitoring port"),
    (
        "redis",
        str,
        "",
        "cluster mode: redis://HOST:PORT/DB (rediss:// for TLS) shared by all nodes",
    ),
    ("workers", _count, 0, "run N worker processes on one port (needs --redis; 0: no workers)"),
]


# On/off switches: ``--no-web`` on the command line, MUXSERVER_NO_WEB=1 in the environment.
FLAGS = [
    ("no-web", "do not serve the web chat page and muxclient.js (the /ws endpoint stays)"),
]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


def explain(text: str, exc: ValueError) -> str:
    """Why ``text`` is not a value of an option, in words (the same from argv and env).

    Python's own ValueError texts ("invalid literal for int() with base 10")
    are replaced; a long value is shortened, since the limit is the news.
    """
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    why = str(exc)
    if "must" in why:
        return f"{shown}: {why}"
    if "int()" in why:
        return f"{shown} is not a whole number"
    if "float" in why:
        return f"{shown} is not a number"
    return f"{shown}: not a valid value"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump to stdout
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="muxserver",
        description="Real-time messaging server: rooms, namespaces, events, presence.",
        epilog="Every option can also be set as MUXSERVER_<OPTION>, e.g. MUXSERVER_PORT=9000. "
        "`muxserver check-config [OPTIONS]` prints the effective configuration and "
        "where each value came from.",
    )
    parser.add_argument("--version", action="version", version=f"muxserver {__version__}")
    for option, conv, default, help_text in OPTIONS:

        def convert(text, _conv=conv, _opt=option):
            try:
                return _conv(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(explain(text, exc)) from None

        convert.__name__ = option  # argparse names the option in its message
        parser.add_argument(
            f"--{option}",
            type=convert,
            default=None,
            metavar=option.split("-")[-1].upper(),
            help=f"{help_text} (default {default}; env {env_name(option)})",
        )
    for option, help_text in FLAGS:
        parser.add_argument(
            f"--{option}", action="store_const", const=True, default=None,
            help=f"{help_text} (env {env_name(option)}=1)",
        )  # fmt: skip
    return parser


def resolve(argv: list[str] | None = None, environ=None, sources: dict | None = None) -> dict:
    """Parse the command line over the environment over the defaults.

    ``sources``, if given, is filled with where each value came from.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for option, conv, default, _ in OPTIONS:
        key = option.replace("-", "_")
        value = getattr(args, key)
        if sources is not None:
            sources[key] = "command line" if value is not None else "default"
        if value is None and env_name(option) in environ:
            if sources is not None:
                sources[key] = f"env {env_name(option)}"
            raw = environ[env_name(option)]
            try:
                value = conv(raw)
            except ValueError as exc:
                # Worded like argparse's "argument --port: ..." for the same value.
                why = explain(raw, exc)
                parser.exit(2, f"muxserver: error: environment {env_name(option)}: {why}\n")
        values[key] = default if value is None else value
    for option, _ in FLAGS:
        key = option.replace("-", "_")
        value = getattr(args, key)
        if sources is not None:
            sources[key] = "command line" if value else "default"
        if value is None and env_name(option) in environ:
            raw = environ[env_name(option)]
            if raw.strip().lower() not in _TRUE + _FALSE:
                parser.exit(2, f"muxserver: error: {env_name(option)}={raw!r}: must be 1 or 0\n")
            value = raw.strip().lower() in _TRUE
            if sources is not None:
                sources[key] = f"env {env_name(option)}"
        values[key] = bool(value)
    return values


PEM_BEGIN = b"-----BEGIN "


def check_pem(option: str, path: str) -> str | None:
    """Why the file given to ``--tls-cert``/``--tls-key`` cannot serve, or None.

    OpenSSL's own errors name neither the file nor the problem in words
    ("[Errno 2] No such file or directory", "[SSL] PEM lib").
    """
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
    except FileNotFoundError:
        return f"--{option} {path}: no such file"
    except IsADirectoryError:
        return f"--{option} {path}: is a directory, not a PEM file"
    except OSError as exc:
        return f"--{option} {path}: cannot read it: {exc.strerror or exc}"
    if PEM_BEGIN not in head:
        what = "certificate" if option == "tls-cert" else "private key"
        return (
            f"--{option} {path} is not a PEM file: expected a {what} between "
            f"'-----BEGIN ...-----' and '-----END ...-----' lines"
        )
    return None


def tls_load_error(config: Config, exc: Exception) -> str:
    """One line on why OpenSSL refused the certificate/key pair, in words."""
    files = config.tls_cert + (f" and --tls-key {config.tls_key}" if config.tls_key else "")
    reason = getattr(exc, "reason", None) or ""
    if reason == "KEY_VALUES_MISMATCH":
        why = "the private key does not belong to the certificate"
    elif "PEM" in str(exc) or reason in ("NO_START_LINE", "PEM_LIB"):
        why = (
            "no usable certificate and private key in PEM form (put the key in the "
            "same file, or give it with --tls-key)"
        )
    else:
        why = str(exc)
    return f"cannot load the TLS certificate/key from --tls-cert {files}: {why}"


def check_config(argv: list[str]) -> int:
    """``muxserver check-config [OPTIONS]``: each effective value and its source."""
    sources: dict = {}
    values = resolve(argv, sources=sources)
    print(f"# muxserver {__version__}: effective configuration (option, value, source)")
    for option in [o[0] for o in OPTIONS] + [f[0] for f in FLAGS]:
        key = option.replace("-", "_")
        value = values[key]
        if key == "token" and value:
            shown = "(set, hidden)"
        elif key == "redis" and value:
            shown = _redacted(value)
        elif value == "":
            shown = '""'
        else:
            shown = str(value)
        print(f"{option:<16} {shown:<24} {sources[key]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["check-config"]:
        return check_config(args[1:])
    values = resolve(args)
    log_format = values.pop("log_format")
    setup_logging(values.pop("log_level"), log_format)
    stats_interval = values.pop("stats_interval")
    metrics_host, metrics_port = values.pop("metrics_host"), values.pop("metrics_port")
    token_file = values.pop("token_file")
    redis_url, workers = values.pop("redis"), values.pop("workers")
    if workers and not redis_url:
        print(
            "muxserver: error: --workers needs --redis: the workers share rooms and nicks"
            " through Redis (e.g. --redis redis://127.0.0.1:6379/0)",
            file=sys.stderr,
        )
        return 2
    if redis_url:
        why = _check_redis(redis_url)
        if why:
            print(f"muxserver: {why}", file=sys.stderr)
            return 1
    if workers:
        from .workers import supervise

        return supervise(args, workers, values["host"], values["port"])
    if token_file:
        if values["token"]:
            print("muxserver: error: give --token or --token-file, not both", file=sys.stderr)
            return 2
        try:
            with open(token_file, encoding="utf-8") as fh:
                values["token"] = fh.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"muxserver: cannot read token file {token_file}: {exc}", file=sys.stderr)
            return 1
        if not values["token"]:
            print(f"muxserver: token file {token_file} is empty", file=sys.stderr)
            return 1
    if values["tls_key"] and not values["tls_cert"]:
        print("muxserver: error: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    for option in ("tls-cert", "tls-key"):
        problem = check_pem(option, values[option.replace("-", "_")])
        if problem:
            print(f"muxserver: {problem}", file=sys.stderr)
            return 1
    values["web"] = not values.pop("no_web")
    config = Config(**values)
    config.reuse_port = bool(os.environ.get("MUXSERVER_WORKER"))  # a --workers child
    try:
        server = Server(config)
    except (OSError, ssl.SSLError) as exc:
        print(f"muxserver: {tls_load_error(config, exc)}", file=sys.stderr)
        return 1
    try:
        host, port = server.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            other = config.port + 1 if 0 < config.port < 65535 else 7879
            reason = (
                f"port {config.port} is already in use (pick another with --port, "
                f"e.g. --port {other}, or --port 0 for any free one)"
            )
        elif exc.errno == errno.EACCES:
            reason = f"permission denied binding {config.host}:{config.port}"
        elif isinstance(exc, socket.gaierror):
            reason = f"cannot resolve host {config.host!r}"
        else:
            reason = f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        print(f"muxserver: {reason}", file=sys.stderr)
        return 1
    monitor = None
    if metrics_port != "off":
        monitor = Monitor(server, metrics_host, metrics_port)
        try:
            mhost, mport = monitor.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = f"metrics port {metrics_port} is already in use"
            elif isinstance(exc, socket.gaierror):
                reason = f"cannot resolve metrics host {metrics_host!r}"
            else:
                reason = (
                    f"cannot listen on metrics {metrics_host}:{metrics_port}: {exc.strerror or exc}"
                )
            print(f"muxserver: {reason}", file=sys.stderr)
            server.close()
            server.loop.close()
            return 1
        # Logged before the ready line, so whoever saw that line can find
        # the port here (tests start with --metrics-port 0).
        mshown = f"[{mhost}]" if ":" in mhost else mhost
        log.info("metrics on http://%s:%d/metrics", mshown, mport)
    if stats_interval:
        StatsReporter(server, stats_interval).start()
    backplane = None
    if redis_url:
        from .backplane.cluster import Backplane

        backplane = Backplane(server, redis_url)
        backplane.start()
        # Wait (briefly) for Redis so the first HELLO is not refused UNAVAILABLE;
        # a node that cannot reach it still starts and keeps retrying.
        deadline = server.loop.time() + 5.0
        while not backplane.up and server.loop.time() < deadline:
            server.loop.run_once(0.05)
        if not backplane.up:
            log.warning("cluster: Redis at %s is not reachable yet; retrying", _redacted(redis_url))

    interrupted = []

    def on_signal(signum: int) -> None:
        if signum not in (signal.SIGTERM, signal.SIGINT):
            return  # another handler's signal also reaches the wake-up fd
        if server.shutting_down and signum == signal.SIGINT:
            interrupted.append(signum)  # second Ctrl-C: leave now
            server.loop.stop()
            return
        server.begin_shutdown()

    server.loop.handle_signals((signal.SIGTERM, signal.SIGINT), on_signal)
    shown = f"[{host}]" if ":" in host else host
    print(f"muxserver listening on {shown}:{port}", flush=True)
    if log_format == "json":
        # Log shippers read only the log stream; a person reads the line above once.
        log.info(
            "muxserver %s listening on %s:%d%s", __version__, shown, port,
            " (TLS)" if config.tls_cert else "",
        )  # fmt: skip
    try:
        server.run()
        if backplane is not None:
            _leave_cluster(server, backplane)
    finally:
        if monitor is not None:
            monitor.close()
        if backplane is not None:
            backplane.close()
        server.close()
        server.loop.close()
    if interrupted:
        return 130
    log.info("muxserver stopped")
    return 0


def _redacted(url: str) -> str:
    """The Redis URL without its password, for logs and check-config."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, userinfo = head.partition("://")
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{tail}"


def _check_redis(url: str) -> str:
    """Why --redis cannot work (bad URL, no hiredis), or ''."""
    from .backplane.resp import hiredis_module, parse_url

    try:
        parse_url(url)
        hiredis_module()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return ""


def _leave_cluster(server, backplane) -> None:
    """After the drain: take this node's nicks and members out of Redis (bounded wait)."""
    done = []
    backplane.shutdown(lambda: done.append(1))
    deadline = server.loop.time() + 2.0
    while not done and server.loop.time() < deadline:
        server.loop.run_once(0.05)


log = logging.getLogger("muxserver")


if __name__ == "__main__":
    sys.exit(main())
