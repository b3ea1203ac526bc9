"""protocol: round trips of every frame type, malformed bodies, name rules."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxserver import protocol as P
from muxserver.framing import FrameDecoder

SAMPLES = [
    P.Hello(1, "/chat", "alice", "s3cret"),
    P.Hello(1, "/", "", ""),
    P.Join(7, "lobby", 1),
    P.Leave(8, "lobby"),
    P.Nick(9, "bob"),
    P.Emit(10, P.TARGET_ROOM, "lobby", "msg", b"\x00\xffpayload", 1),
    P.Emit(0, P.TARGET_DIRECT, "bob", "dm", b""),
    P.Emit(11, P.TARGET_BROADCAST, "", "all", b"x" * 1000),
    P.Ping(2**64 - 1),
    P.Pong(0),
    P.Who(12, "lobby"),
    P.Rooms(13, 1),
    P.Bye(),
    P.Welcome(1, 42, "guest-42", 1 << 20, 25000, "muxserver"),
    P.Reply(7, 0, b""),
    P.Reply(10, 0, b"\x00\x00\x00\x05"),
    P.Reply(3, P.NOT_MEMBER, b"not a member"),
    P.Event(0, "alice", "lobby", "msg", b"hi"),
    P.Presence(3, "lobby", "bob", "robert"),
    P.Error(P.TOO_LARGE, "frame too large"),
    P.ServerPing(5),
    P.ServerPong(6),
    # version 2
    P.Hello(2, "/chat", "alice", "", "tok-123"),
    P.Hello(2, "/", "", "", ""),
    P.Join(14, "lobby", P.JOIN_SEQUENCED | P.JOIN_PRESENCE, 2**64 - 1, 41, P.REPLAY_ALL),
    P.Welcome(2, 42, "bob", 1 << 20, 25000, "muxserver", "r" * 64, 120000, 1),
    P.Emit(15, P.TARGET_ROOM, "lobby", "j", b"{}", P.emit_flags(True, P.PAYLOAD_JSON)),
    P.Event(P.event_kind_byte(P.TARGET_DIRECT, P.PAYLOAD_TEXT), "al", "", "dm", b"hi"),
    P.EventSeq(7, 0x20, "al", "lobby", "msg", b"\x00"),
    P.Gap("lobby", 40, 57),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    [(ftype, body)] = FrameDecoder().feed(P.encode(msg))
    assert P.decode(ftype, body) == msg


def test_hello_bytes_match_the_spec():
    assert P.encode(P.Hello(1, "/", "al", "")) == b"\x00\x00\x00\x08\x01\x01\x01/\x02al\x00"


def test_event_tail_equals_emit_tail():
    emit = P.encode(P.Emit(1, 0, "room", "ev", b"data"))
    event = P.encode(P.Event(0, "nick", "room", "ev", b"data"))
    assert emit[4 + 1 + 6 :] == event[4 + 1 + 1 + 5 :]


def body(msg):
    return P.encode(msg)[5:]


def bad(ftype, raw):
    with pytest.raises(P.ProtocolError) as err:
        P.decode(ftype, raw)
    return err.value.code


@pytest.mark.parametrize(
    "ftype,raw",
    [
        (P.HELLO, b""),  # too short
        (P.HELLO, b"\x01\x05/"),  # str8 longer than the body
        (P.HELLO, body(P.Hello(1, "/", "a", "")) + b"!"),  # trailing bytes
        (P.JOIN, b"\x00\x00\x00"),
        (P.JOIN, body(P.Join(1, "r")) + b"x"),
        (P.JOIN, b"\x00\x00\x00\x01\x00\x09abc"),
        (P.LEAVE, b"\x00\x00\x00\x01"),
        (P.NICK, body(P.Nick(1, "n")) + b"\x00"),
        (P.EMIT, b"\x00\x00\x00\x01\x00\x00"),
        (P.EMIT, b"\x00\x00\x00\x01\x00\x00\x05ab"),
        (P.EMIT, b"\x00\x00\x00\x01\x00\x03\x01r\x01e"),  # target_kind 3
        (P.EMIT, b"\x00\x00\x00\x01\x00\x02\x01r\x01e"),  # broadcast with a target
        (P.PING, b"\x00" * 7),
        (P.PING, b"\x00" * 9),
        (P.PONG, b""),
        (P.WHO, b"\x00\x00\x00\x01\x02a"),
        (P.ROOMS, b"\x00\x00\x00\x01\x02"),  # scope 2
        (P.ROOMS, b"\x00\x00\x00\x01\x00\x00"),
        (P.BYE, b"\x00"),
    ],
)
def test_malformed_bodies_are_bad_frame(ftype, raw):
    assert bad(ftype, raw) == P.BAD_FRAME


def test_parse_emit_head_agrees_with_decode():
    raw = body(P.Emit(9, P.TARGET_ROOM, "lobby", "msg", b"payload", 1))
    req, flags, kind, target, event, start = P.parse_emit_head(raw)
    assert (req, flags, kind, target, event, raw[start:]) == (9, 1, 0, b"lobby", b"msg", b"payload")
    for cut in range(len(raw) - len(b"payload")):
        with pytest.raises(P.ProtocolError):
            P.parse_emit_head(raw[:cut])


def test_unknown_type():
    assert bad(0x42, b"") == P.UNKNOWN_TYPE


def test_reserved_flag_bits_are_ignored():
    assert P.decode_join(b"\x00\x00\x00\x01\xfe\x01r", 1).flags == 0xFE
    assert P.decode(P.JOIN, b"\x00\x00\x00\x01\xfc\x01r").flags == 0xFC


@pytest.mark.parametrize(
    "name,kind",
    [
        ("", "room"),
        ("a" * 256, "room"),
        ("bad\x07bell", "room"),
        ("c1\x85control", "event"),
        ("\udcff", "room"),  # invalid UTF-8, decoded with surrogateescape
        ("", "nick"),
        ("a" * 33, "nick"),
        ("two words", "nick"),
        ("tab\tnick", "nick"),
        ("nons", "namespace"),
        ("/ns\x00", "namespace"),
    ],
)
def test_name_rules_reject(name, kind):
    assert P.check_name(name, kind) is not None


@pytest.mark.parametrize(
    "name,kind",
    [("lobby", "room"), ("a b c", "room"), ("ü" * 127, "room"), ("émile", "nick"),
     ("x" * 32, "nick"), ("/", "namespace"), ("/games/eu", "namespace"), ("chat:msg", "event")],
)  # fmt: skip
def test_name_rules_accept(name, kind):
    assert P.check_name(name, kind) is None


def test_name_cache_rejects_invalid_utf8_and_remembers_good_names():
    cache = P.NameCache("room", limit=2)
    assert cache.get(b"\xff\xfe") is None
    assert cache.get(b"ok") == "ok"
    assert cache.get(b"two") == "two"
    assert cache.get(b"three") == "three"  # cache emptied when full, still right
    assert "UTF-8" in cache.why(b"\xff")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=80))
def test_decode_any_body_returns_or_raises_protocol_error(ftype, raw):
    try:
        P.decode(ftype, raw)
    except P.ProtocolError as exc:
        assert exc.code in (P.BAD_FRAME, P.UNKNOWN_TYPE)


def test_v2_fields():
    ev = P.Event(P.event_kind_byte(P.TARGET_BROADCAST, P.PAYLOAD_JSON), "a", "", "e", b"[]")
    assert (ev.kind, ev.payload_type) == (P.TARGET_BROADCAST, P.PAYLOAD_JSON)
    assert P.payload_type_of(P.emit_flags(True, P.PAYLOAD_TEXT)) == P.PAYLOAD_TEXT
    assert P.emit_flags(True, P.PAYLOAD_TEXT) == 0b011


def test_unknown_hello_version_parses_as_unsupported():
    # Whatever follows an unknown version byte, the answer must be UNSUPPORTED_VERSION.
    assert P.decode(P.HELLO, b"\x07garbage").version == 7


def test_v1_join_ignores_the_sequenced_bit():
    flags = P.JOIN_SEQUENCED | P.JOIN_PRESENCE
    raw = P.REQ_U8.pack(3, flags) + P.str8("r")  # no epoch/after/replay_max tail
    assert P.decode_join(raw, 1) == P.Join(3, "r", flags)
    # The same body from a version-2 session lacks its SEQUENCED tail: short.
    assert bad(P.JOIN, raw) == P.BAD_FRAME


def test_v2_reply_helpers():
    [(_, b)] = FrameDecoder().feed(P.reply_count_seq(9, 3, 77))
    reply = P.decode(P.REPLY, b)
    assert P.parse_emit_reply(reply.body) == (3, 77)
    assert P.parse_count(reply.body) == 3
    [(_, b)] = FrameDecoder().feed(P.reply_join_seq(5, P.GAP_RECOVERY, 11, 40, 57))
    reply = P.decode(P.REPLY, b)
    assert (reply.req, reply.status) == (5, P.OK)
    assert P.parse_join_reply(reply.body) == (P.GAP_RECOVERY, 11, 40, 57)
    [(t, b)] = FrameDecoder().feed(P.gap_frame(b"lobby", 1, 2))
    assert P.decode(t, b) == P.Gap("lobby", 1, 2)
