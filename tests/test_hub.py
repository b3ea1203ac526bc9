"""hub: rooms, nicks, namespaces and presence, without sockets."""

import pytest

from muxserver import protocol as P
from muxserver.hub import Hub, HubError, Member


def members(hub, *specs):
    out = []
    for spec in specs:
        ns, _, nick = spec.rpartition(":")
        m = Member()
        hub.attach(m, ns or "/", nick)
        out.append(m)
    return out


def test_attach_and_nick_uniqueness_per_namespace():
    hub = Hub()
    a, b = members(hub, "alice", "/other:alice")
    assert a.ns is not b.ns
    with pytest.raises(HubError) as err:
        hub.attach(Member(), "/", "alice")
    assert err.value.status == P.NICK_TAKEN


def test_attach_rejects_bad_names():
    hub = Hub()
    for ns, nick in [("nope", "a"), ("/", "has space"), ("/", "")]:
        with pytest.raises(HubError) as err:
            hub.attach(Member(), ns, nick)
        assert err.value.status == P.INVALID_NAME
    assert hub.namespaces == {}


def test_room_lifecycle_and_join_order():
    hub = Hub()
    a, b, c = members(hub, "a", "b", "c")
    for m in (b, a, c):
        hub.join(m, "r")
    assert hub.who(a, "r") == ["b", "a", "c"]
    assert hub.rooms(a, all_rooms=True) == [("r", 3)]
    for m in (a, b, c):
        hub.leave(m, "r")
    assert hub.rooms(a, all_rooms=True) == []  # removed with its last member


def test_join_and_leave_are_idempotent():
    hub = Hub()
    (a,) = members(hub, "a")
    assert hub.join(a, "r") == [] and hub.join(a, "r") == []
    assert hub.who(a, "r") == ["a"]
    assert hub.leave(a, "nothere") == []


def test_presence_only_to_watchers_never_to_subject():
    hub = Hub()
    a, b, c = members(hub, "a", "b", "c")
    hub.join(a, "r", presence=True)
    hub.join(b, "r", presence=False)
    [change] = hub.join(c, "r", presence=True)
    assert change.recipients == [a]
    assert change.presence == P.Presence(P.PRESENCE_JOIN, "r", "c")
    [change] = hub.leave(a, "r")
    assert change.recipients == [c]
    assert change.presence == P.Presence(P.PRESENCE_LEAVE, "r", "a")


def test_nick_change_presence_per_room():
    hub = Hub()
    a, b = members(hub, "a", "b")
    hub.join(a, "r1", presence=True)
    hub.join(a, "r2", presence=True)
    hub.join(b, "r1", presence=True)
    hub.join(b, "r2")
    changes = hub.rename(b, "bee")
    assert [(c.recipients, c.presence) for c in changes] == [
        ([a], P.Presence(P.PRESENCE_NICK, "r1", "b", "bee")),
        ([a], P.Presence(P.PRESENCE_NICK, "r2", "b", "bee")),
    ]
    assert hub.find(a, "bee") is b and hub.find(a, "b") is None
    with pytest.raises(HubError) as err:
        hub.rename(b, "a")
    assert err.value.status == P.NICK_TAKEN


def test_detach_leaves_every_room_and_frees_the_nick():
    hub = Hub()
    a, b = members(hub, "a", "b")
    hub.join(a, "r1", presence=True)
    hub.join(a, "r2", presence=True)
    hub.join(b, "r1")
    hub.join(b, "r2")
    changes = hub.detach(b)
    assert sorted(c.presence.room for c in changes) == ["r1", "r2"]
    assert all(c.presence.kind == P.PRESENCE_LEAVE for c in changes)
    assert hub.find(a, "b") is None
    hub.detach(a)
    assert hub.namespaces == {}


def test_namespaces_isolated():
    hub = Hub()
    a, b = members(hub, "/x:a", "/y:b")
    hub.join(a, "r")
    hub.join(b, "r")
    assert hub.who(a, "r") == ["a"] and hub.who(b, "r") == ["b"]
    assert hub.find(a, "b") is None


def test_room_limit():
    hub = Hub(max_rooms=2)
    (a,) = members(hub, "a")
    hub.join(a, "r1")
    hub.join(a, "r2")
    with pytest.raises(HubError) as err:
        hub.join(a, "r3")
    assert err.value.status == P.LIMIT
    hub.join(a, "r2")  # re-joining a room one is in is not a new room


def test_invalid_room_names():
    hub = Hub()
    (a,) = members(hub, "a")
    for bad in ("", "x" * 256, "bell\x07"):
        with pytest.raises(HubError) as err:
            hub.join(a, bad)
        assert err.value.status == P.INVALID_NAME


def test_many_joins_without_watchers_produce_no_changes():
    hub = Hub()
    ms = members(hub, *[f"m{i}" for i in range(2000)])
    assert all(hub.join(m, "big") == [] for m in ms)
    assert len(hub.who(ms[0], "big")) == 2000
