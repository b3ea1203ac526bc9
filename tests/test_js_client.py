"""muxclient.js under Node's test runner, against byte fixtures from the Python codec.

The fixtures are made here, with muxserver/protocol.py (the codec the server
uses), so the JavaScript encoder and decoder are held to the same bytes as
the server: client frames must encode to exactly these bytes, server frames
must decode to these values. Version-2 fields the Python codec does not
build (HELLO resume, WELCOME resume fields, payload-type bits, the v2 EMIT
reply) are composed from its own primitives (encode_frame, str8, the
structs). ``sequenced_fixtures`` holds section 9: SEQUENCED JOINs as the
client must send them, the JOIN REPLY of each recovery outcome, EVENT_SEQ
and GAP, all from the codec the server uses.

Node is required: a missing ``node`` fails this test, it is not skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from muxserver import protocol as P
from muxserver.framing import encode_frame

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = ROOT / "tests" / "js"


def _hello_v2(ns: str, nick: str, token: str, resume: bytes) -> bytes:
    body = bytes((2,)) + P.str8(ns) + P.str8(nick) + P.str8(token) + P.str8(resume)
    return encode_frame(P.HELLO, body)


def client_fixtures() -> list[dict]:
    """Frames muxclient.js sends: `call` is what the JS test invokes, `hex` the bytes."""
    text_flags = 1 << 1
    json_flags = (2 << 1) | P.EMIT_ECHO
    cases = [
        ("hello", ["/", "ann", "", ""], _hello_v2("/", "ann", "", b"")),
        ("hello", ["/game", "zoë", "s3cret", "tok"], _hello_v2("/game", "zoë", "s3cret", b"tok")),
        ("join", [1, "lobby", 1], P.encode(P.Join(1, "lobby", 1))),
        ("join", [0xFFFFFFFF, "ünï", 0], P.encode(P.Join(0xFFFFFFFF, "ünï", 0))),
        ("leave", [2, "lobby"], P.encode(P.Leave(2, "lobby"))),
        ("nick", [3, "bob"], P.encode(P.Nick(3, "bob"))),
        ("emit_bin", [4, 0, 0, "lobby", "blob", [0, 255, 7]],
         P.encode(P.Emit(4, 0, "lobby", "blob", b"\x00\xff\x07", 0))),
        ("emit_text", [0, text_flags, 1, "bob", "say", "héllo"],
         P.encode(P.Emit(0, 1, "bob", "say", "héllo".encode(), text_flags))),
        ("emit_json", [5, json_flags, 2, "", "cfg", {"a": [1, 2]}],
         P.encode(P.Emit(5, 2, "", "cfg", b'{"a":[1,2]}', json_flags))),
        ("ping", ["18446744073709551615"], P.encode(P.Ping(2**64 - 1))),
        ("pong", ["42"], P.encode(P.Pong(42))),
        ("who", [6, "lobby"], P.encode(P.Who(6, "lobby"))),
        ("rooms", [7, 1], P.encode(P.Rooms(7, 1))),
        ("bye", [], P.encode(P.Bye())),
    ]  # fmt: skip
    return [{"call": c, "args": a, "hex": h.hex()} for c, a, h in cases]


def server_fixtures() -> list[dict]:
    """Frames the server sends, several per message where it matters, and the decoded value."""
    welcome_v2 = encode_frame(
        P.WELCOME,
        bytes((2,)) + P.U32.pack(7) + P.str8("guest-7") + P.U32.pack(1048576)
        + P.U32.pack(25000) + P.str8("muxserver") + P.str8(b"\x01\x02tok")
        + P.U32.pack(120000) + bytes((1,)),
    )  # fmt: skip
    welcome_v1 = P.encode(P.Welcome(1, 9, "ann", 65536, 1000, "srv"))
    event_json = P.encode(P.Event(0 | (2 << 4), "ann", "lobby", "cfg", b'{"x":"\xc3\xa9"}'))
    event_text = P.encode(P.Event(1 | (1 << 4), "bob", "", "say", "hi ✓".encode()))
    event_bin = P.encode(P.Event(2, "cy", "", "blob", b"\x00\x01"))
    event_seq = P.encode(P.EventSeq(2**63 + 5, 0 | (1 << 4), "ann", "lobby", "say", b"seq"))
    gap = P.encode(P.Gap("lobby", 3, 9))
    who = P.encode(P.Reply(8, P.OK, P.U32.pack(3) + P.U16.pack(2) + P.str8("ann") + P.str8("bob")))
    rooms = P.encode(
        P.Reply(
            9,
            P.OK,
            P.U32.pack(2) + P.U16.pack(2) + P.str8("a") + P.U32.pack(1)
            + P.str8("b") + P.U32.pack(70000),
        )
    )  # fmt: skip
    emit_v2 = P.encode(P.Reply(10, P.OK, P.U32.pack(3) + P.U64.pack(17)))
    emit_v1 = P.reply_count(11, 4)
    err_reply = P.reply_error(12, P.NOT_MEMBER, "not in room x")
    presence = P.encode(P.Presence(P.PRESENCE_NICK, "lobby", "ann", "anna"))
    error = P.error_frame(P.SLOW_CONSUMER, "output over 8388608 bytes")
    ping = P.ping_frame(P.SERVER_PING, 2**64 - 2)
    pong = P.ping_frame(P.SERVER_PONG, 1)
    U = "u64:"  # a BigInt, written as a string in JSON
    return [
        {"hex": welcome_v2.hex(), "expect": [{
            "type": "WELCOME", "version": 2, "connId": 7, "nick": "guest-7",
            "maxFrame": 1048576, "pingIntervalMs": 25000, "serverName": "muxserver",
            "resumeToken": "hex:" + b"\x01\x02tok".hex(), "resumeWindowMs": 120000,
            "resumed": True}]},
        {"hex": welcome_v1.hex(), "expect": [{
            "type": "WELCOME", "version": 1, "connId": 9, "nick": "ann", "maxFrame": 65536,
            "pingIntervalMs": 1000, "serverName": "srv", "resumed": False}]},
        # three frames in one WebSocket message
        {"hex": (event_json + event_text + event_bin).hex(), "expect": [
            {"type": "EVENT", "kind": "room", "ptype": 2, "sender": "ann", "source": "lobby",
             "event": "cfg", "value": {"x": "é"}},
            {"type": "EVENT", "kind": "direct", "ptype": 1, "sender": "bob", "source": "",
             "event": "say", "value": "hi ✓"},
            {"type": "EVENT", "kind": "broadcast", "ptype": 0, "sender": "cy", "source": "",
             "event": "blob", "value": "hex:0001"}]},
        {"hex": (event_seq + gap).hex(), "expect": [
            {"type": "EVENT_SEQ", "seq": U + str(2**63 + 5), "kind": "room", "ptype": 1,
             "sender": "ann", "source": "lobby", "event": "say", "value": "seq"},
            {"type": "GAP", "room": "lobby", "first": U + "3", "last": U + "9"}]},
        {"hex": (who + rooms + emit_v2 + emit_v1 + err_reply).hex(), "expect": [
            {"type": "REPLY", "req": 8, "status": 0, "parse": "who",
             "value": {"total": 3, "nicks": ["ann", "bob"]}},
            {"type": "REPLY", "req": 9, "status": 0, "parse": "rooms",
             "value": {"total": 2, "rooms": [{"name": "a", "members": 1},
                                             {"name": "b", "members": 70000}]}},
            {"type": "REPLY", "req": 10, "status": 0, "parse": "emit", "value": 3},
            {"type": "REPLY", "req": 11, "status": 0, "parse": "emit", "value": 4},
            {"type": "REPLY", "req": 12, "status": 9, "message": "not in room x"}]},
        {"hex": (presence + ping + pong + error).hex(), "expect": [
            {"type": "PRESENCE", "kind": "nick", "room": "lobby", "nick": "ann", "newNick": "anna"},
            {"type": "PING", "nonce": U + str(2**64 - 2)},
            {"type": "PONG", "nonce": U + "1"},
            {"type": "ERROR", "code": 13, "status": "SLOW_CONSUMER",
             "message": "output over 8388608 bytes"}]},
    ]  # fmt: skip


def sequenced_fixtures() -> dict:
    """Section 9 bytes: JOINs the client sends, and REPLY / EVENT_SEQ / GAP it reads."""
    seq = P.JOIN_SEQUENCED
    big = 0x1122334455667788
    # join(): {room, options} for MuxClient.join on a fresh client (first req is 1);
    # encode: the same through encode.join with an explicit position.
    joins = [
        {
            "room": "games",
            "options": {"history": 20},
            "hex": P.encode(P.Join(1, "games", seq, 0, 0, 20)).hex(),
        },
        {
            "room": "lobby",
            "options": {"presence": True},
            "hex": P.encode(P.Join(1, "lobby", seq | P.JOIN_PRESENCE, 0, 0, 0)).hex(),
        },
        {
            "room": "ünï",
            "options": {"history": 0xFFFF},
            "hex": P.encode(P.Join(1, "ünï", seq, 0, 0, P.REPLAY_ALL)).hex(),
        },
    ]
    encodes = [
        # the worked example of docs/recovery.md
        {
            "args": [8, "lobby", 1, "u64:" + str(big), "u64:41", P.REPLAY_ALL],
            "hex": P.encode(P.Join(8, "lobby", seq | P.JOIN_PRESENCE, big, 41, P.REPLAY_ALL)).hex(),
        },
        {
            "args": [0xFFFFFFFF, "x", 0, "u64:" + str(2**64 - 1), "u64:" + str(2**53 + 1), 0],
            "hex": P.encode(P.Join(0xFFFFFFFF, "x", seq, 2**64 - 1, 2**53 + 1, 0)).hex(),
        },
    ]
    U = "u64:"
    replies = [
        {
            "hex": P.reply_join_seq(5, rec, epoch, first, last).hex(),
            "expect": {
                "recovery": rec,
                "epoch": U + str(epoch),
                "first": U + str(first),
                "last": U + str(last),
            },
        }
        for rec, epoch, first, last in [
            (P.FRESH, 2**64 - 1, 38, 57),
            (P.COMPLETE, big, 42, 57),
            (P.GAP_RECOVERY, big, 45, 57),
            (P.RESET, 7, 1, 0),
        ]
    ]
    frames = [
        {
            "hex": P.encode(P.EventSeq(45, 0, "alice", "lobby", "chat", b"hi!")).hex(),
            "expect": {
                "type": "EVENT_SEQ",
                "seq": U + "45",
                "kind": "room",
                "ptype": 0,
                "sender": "alice",
                "source": "lobby",
                "event": "chat",
                "value": "hex:686921",
            },
        },
        {
            "hex": P.encode(P.EventSeq(1, 2 << 4, "bob", "ünï", "cfg", b'{"a":1}')).hex(),
            "expect": {
                "type": "EVENT_SEQ",
                "seq": U + "1",
                "kind": "room",
                "ptype": 2,
                "sender": "bob",
                "source": "ünï",
                "event": "cfg",
                "value": {"a": 1},
            },
        },
        {
            "hex": P.gap_frame("ünï".encode(), 40, 57).hex(),
            "expect": {"type": "GAP", "room": "ünï", "first": U + "40", "last": U + "57"},
        },
    ]
    return {"joins": joins, "encodes": encodes, "replies": replies, "frames": frames}


def test_muxclient_js(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is required for the JavaScript client tests (Node 20+)"
    fixtures = tmp_path / "fixtures.json"
    fixtures.write_text(
        json.dumps(
            {
                "client": client_fixtures(),
                "server": server_fixtures(),
                "sequenced": sequenced_fixtures(),
            }
        ),
        "utf-8",
    )
    files = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, "no JavaScript tests found"
    proc = subprocess.run(
        [node, "--test", *files],
        cwd=ROOT,
        env=dict(os.environ, MUXCLIENT_FIXTURES=str(fixtures)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = {
        line.split()[1]: int(line.split()[2])
        for line in proc.stdout.splitlines()
        if line.startswith("# ") and len(line.split()) == 3 and line.split()[2].isdigit()
    }
    assert summary.get("fail") == 0 and summary.get("pass", 0) >= 15, out
