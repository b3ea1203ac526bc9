"""The load test's command-line options, and what the runs make of them (loadtests/locustfile.py).

Apart from the locustfile to keep it under ~700 lines: the options Locust
adds to its parser (they appear in the web UI's start form and travel to
workers with the rest), the per-process :class:`Config` built from them, and
the sizing arithmetic (how many deliveries a run asks for, hence the
``deliver`` sample). Nothing here touches a connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from locust import events

from loadtests import progress

SCENARIOS = ("chat", "broadcast", "direct", "churn", "recovery")
DEFAULT_ADDRESS = ("127.0.0.1", 7878)
ROOM_SIZE = 20  # chat: users per room when --rooms is 0, so load grows linearly with users
TARGET_SAMPLED_PER_S = 10_000  # auto --deliver-sample keeps Locust events under this
PROGRESS_S = progress.DEFAULT_EVERY_S
DRAIN_CAP_S = 120.0  # a drain never takes longer, however much is still arriving


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument(
        "--scenario", choices=SCENARIOS, default="chat",
        help="chat: rooms of users who all talk; broadcast: one hot room, few publishers; "
        "direct: pairs whispering; churn: connect/join/leave/bye in a loop; "
        "recovery: chat in sequenced rooms, users cutting their connections and resuming",
    )  # fmt: skip
    parser.add_argument(
        "--rooms", type=int, default=0,
        help=f"chat/churn: number of rooms (0: one per {ROOM_SIZE} users)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=1.0,
        help="messages/s per sending user (churn: cycles/s per user); 0: no pause",
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=64, help="payload bytes (at least 20)")
    parser.add_argument("--publishers", type=int, default=10, help="broadcast: sending users")
    parser.add_argument(
        "--deliver-sample", type=int, default=0,
        help="fire a Locust 'deliver' event for every Nth delivery (0: pick N so that "
        f"about {TARGET_SAMPLED_PER_S:,}/s are fired at most); every delivery is counted",
    )  # fmt: skip
    parser.add_argument(
        "--no-ack", action="store_true", default=False,
        help="EMIT without a request id: no 'emit' round trip, no expected count",
    )  # fmt: skip
    parser.add_argument("--namespace", default="/loadtest", help="namespace the users live in")
    parser.add_argument(
        "--transport", choices=("tcp", "ws"), default="tcp",
        help="tcp: the raw protocol; ws: the same frames over WebSocket (/ws), as browsers",
    )  # fmt: skip
    parser.add_argument(
        "--drain-timeout", type=float, default=10.0,
        help="at stop, give up waiting for outstanding acks and deliveries after this many "
        f"seconds without a new one (a drain takes {DRAIN_CAP_S:g} s at most)",
    )  # fmt: skip
    parser.add_argument(
        "--summary-file", default="", include_in_web_ui=False,
        help="also write the summary as JSON to this file",
    )  # fmt: skip
    parser.add_argument(
        "--compact", action="store_true", default=False, include_in_web_ui=False,
        help="for loadtests/run.py: a progress line every --progress-every seconds instead "
        "of Locust's stats tables (the CSV and HTML reports keep them), and no summary "
        "(the caller prints it)",
    )  # fmt: skip
    parser.add_argument(
        "--progress-every", type=float, default=PROGRESS_S, include_in_web_ui=False,
        help=f"with --compact: seconds between progress lines (default {PROGRESS_S:g})",
    )  # fmt: skip


@dataclass
class Config:
    scenario: str = "chat"
    rooms: int = 1
    rate: float = 1.0
    size: int = 64
    publishers: int = 10
    sample: int = 1
    acks: bool = True
    namespace: str = "/loadtest"
    transport: str = "tcp"  # or "ws": loadtests/wsclient.py
    drain_timeout: float = 10.0
    summary_file: str = ""
    host: str = DEFAULT_ADDRESS[0]
    port: int = DEFAULT_ADDRESS[1]
    node: int = 0  # this worker's index (0 when not distributed)
    nodes: int = 1  # worker processes


def parse_host(host: str | None) -> tuple[str, int]:
    """``127.0.0.1:7878``, ``mux://host:port``, ``[::1]:7878`` or empty (the default)."""
    if not host:
        return DEFAULT_ADDRESS
    host = host.split("://", 1)[-1].rstrip("/")
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        return host.strip("[]"), DEFAULT_ADDRESS[1]
    return name.strip("[]"), int(port)


def estimate_deliveries(opts, users: int) -> float:
    """Deliveries/s the options ask for, to pick the sample rate before the run."""
    rate, users = max(opts.rate, 0.0) or 100.0, max(users, 1)
    if opts.scenario in ("chat", "recovery"):
        per_room = users / max(opts.rooms or math.ceil(users / ROOM_SIZE), 1)
        return users * rate * max(per_room - 1, 0)
    if opts.scenario == "broadcast":
        return min(opts.publishers, users) * rate * (users - 1)
    if opts.scenario == "direct":
        return users * rate
    return 0.0


def offered_rate(cfg: Config, users: int) -> float | None:
    """Messages/s (churn: cycles/s) the options ask of ``users`` users; None: unpaced."""
    if cfg.rate <= 0:
        return None
    senders = {
        "broadcast": min(cfg.publishers, users),
        "direct": users - users % 2,  # the odd one out has no partner
    }.get(cfg.scenario, users)
    return senders * cfg.rate


def auto_sample(estimate: float) -> int:
    """1, 2, 5, 10, 20, 50... : the smallest keeping sampled events under the target."""
    need = estimate / TARGET_SAMPLED_PER_S
    for exp in range(10):
        for step in (1, 2, 5):
            if step * 10**exp >= need:
                return step * 10**exp
    return 10**10
