"""Who is where: namespaces, rooms, nicknames and presence. Pure, no I/O.

The hub answers two questions for the server: "who gets this" (a room's
members, a namespace's members, the holder of a nick) and "what changed"
(the PRESENCE notices a join, leave, nick change or disconnect produces, and
who should get each). It never touches a socket, so every rule of protocol
sections 4 and 7 that is about membership can be tested here alone.

Members are duck-typed: anything with the writable attributes ``nick``,
``ns`` and ``rooms`` (see :class:`Member`). The server's Connection carries
those slots itself, so a room's member dict holds connections directly and a
broadcast is one loop over it, with no extra hop per recipient.

Rooms keep insertion-ordered dicts: all members (join order is WHO's
order), the *watchers* that asked for PRESENCE (a join then costs work in
proportion to the watchers, not the room: 19,000 joins to one room would
otherwise be quadratic), and how many members speak protocol version 1
(``legacy``, a count; usually 0), so that the router builds a second encoding
of a message only when someone needs it and then asks each member its
``version``. Namespaces keep the same count. (A count, not a second dict of
those members: that was two dict slots per version-1 connection.)

Rooms also keep their version-2 SEQUENCED members apart (``seq``: EVENT_SEQ
live; ``held``: nothing live while a replay catches them up or a resumed
session has not re-joined), for muxserver.sequenced and the router, and tell
``on_members`` every change of their member count (the history keeps a
room's numbering while it has members; parked sessions are members).

Nicks are unique per namespace without regard to case (protocol section 1):
``Namespace.nicks`` is keyed by :func:`nick_key`, the NFKC-normalised,
case-folded form, and maps to the member, whose ``nick`` is shown as chosen.
"""

from __future__ import annotations

import unicodedata
from typing import NamedTuple

from .protocol import (
    INVALID_NAME,
    LIMIT,
    NICK_TAKEN,
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PRESENCE_NICK,
    Presence,
    check_name,
)


class HubError(Exception):
    """A request the hub refuses; ``status`` is the protocol status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Change(NamedTuple):
    """One PRESENCE notice and the members who should receive it."""

    recipients: list
    presence: Presence


def nick_key(nick: str) -> str:
    """The form two nicks are compared in: ``Bob``, ``BOB`` and ``ｂｏｂ`` are one nick."""
    key = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", nick).casefold())
    # Most nicks are their own key: keep one string, not two, per member.
    return nick if key == nick else key


class Member:
    """The minimal member shape (the server's Session has the same slots)."""

    __slots__ = ("nick", "ns", "rooms", "version")

    def __init__(self, nick: str = "", version: int = 2) -> None:
        self.nick = nick
        self.ns: Namespace | None = None
        self.rooms: dict[str, Room] = {}
        self.version = version

    def __repr__(self) -> str:
        return f"<Member {self.nick!r}>"


class Room:
    __slots__ = ("name", "key", "members", "watchers", "legacy", "seq", "held", "parked", "remote")

    def __init__(self, name: str, key=None) -> None:
        self.name = name
        self.key = key if key is not None else name  # (namespace, room): the history's key
        self.members: dict = {}  # member -> None, in join order
        self.watchers: dict = {}  # members who asked for PRESENCE
        self.legacy = 0  # members speaking protocol version 1
        # Version-2 SEQUENCED members (section 9), kept by muxserver.sequenced:
        # ``seq`` get EVENT_SEQ live; ``held`` get nothing live (a replay is
        # catching them up, or a resumed session has not re-joined yet). In a
        # cluster a ``seq`` value is the first seq it takes live (backplane).
        self.seq: dict = {}
        self.held: dict = {}
        self.parked = 0  # members without a connection (section 10): not recipients
        self.remote = 0  # members on other cluster nodes, as last known (backplane)

    def __len__(self) -> int:
        return len(self.members)


class Namespace:
    __slots__ = ("name", "members", "nicks", "rooms", "legacy", "parked", "remote")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict = {}  # member -> None, in arrival order
        self.nicks: dict = {}  # nick_key(nick) -> member
        self.rooms: dict[str, Room] = {}
        self.legacy = 0  # members speaking protocol version 1
        self.parked = 0  # members without a connection (section 10): not recipients
        self.remote = 0  # members on other cluster nodes, as last known (backplane)


class Hub:
    def __init__(self, max_rooms: int = 1000, on_members=None) -> None:
        self.max_rooms = max_rooms
        self.namespaces: dict[str, Namespace] = {}
        # on_members(room_key, count): told after every change of a room's
        # member count (the history keeps a room's numbering while it has any).
        self.on_members = on_members

    # ------------------------------------------------------------ session
    def nick_taken(self, ns_name: str, nick: str) -> bool:
        ns = self.namespaces.get(ns_name)
        return ns is not None and nick_key(nick) in ns.nicks

    def attach(self, member, ns_name: str, nick: str) -> Namespace:
        """Admit ``member`` to namespace ``ns_name`` under ``nick``."""
        why = check_name(ns_name, "namespace") or check_name(nick, "nick")
        if why:
            raise HubError(INVALID_NAME, why)
        ns = self.namespaces.get(ns_name)
        if ns is None:
            ns = self.namespaces[ns_name] = Namespace(ns_name)
        key = nick_key(nick)
        holder = ns.nicks.get(key)
        if holder is not None:
            if not ns.members:
                del self.namespaces[ns_name]
            raise HubError(NICK_TAKEN, _taken(nick, holder.nick, ns_name))
        member.nick = nick
        member.ns = ns
        member.rooms = {}
        ns.members[member] = None
        if member.version < 2:
            ns.legacy += 1
        ns.nicks[key] = member
        return ns

    def detach(self, member) -> list[Change]:
        """Remove ``member`` from everything: a leave for each of its rooms."""
        ns = member.ns
        if ns is None:
            return []
        changes = [c for name in list(member.rooms) for c in self.leave(member, name)]
        if ns.members.pop(member, 0) is None and member.version < 2:  # it was there
            ns.legacy -= 1
        key = nick_key(member.nick)
        if ns.nicks.get(key) is member:
            del ns.nicks[key]
        member.ns = None
        if not ns.members:
            del self.namespaces[ns.name]
        return changes

    # -------------------------------------------------------------- rooms
    def join(self, member, room_name: str, presence: bool = False) -> list[Change]:
        why = check_name(room_name, "room")
        if why:
            raise HubError(INVALID_NAME, why)
        ns = member.ns
        room = member.rooms.get(room_name)
        if room is not None:
            # Idempotent; a second JOIN may still switch PRESENCE on or off.
            if presence:
                room.watchers[member] = None
            else:
                room.watchers.pop(member, None)
            return []
        if len(member.rooms) >= self.max_rooms:
            raise HubError(LIMIT, f"already in {self.max_rooms} rooms (the limit)")
        room = ns.rooms.get(room_name)
        if room is None:
            room = ns.rooms[room_name] = Room(room_name, (ns.name, room_name))
        changes = []
        if room.watchers:
            changes.append(
                Change(list(room.watchers), Presence(PRESENCE_JOIN, room_name, member.nick))
            )
        room.members[member] = None
        if member.version < 2:
            room.legacy += 1
        if presence:
            room.watchers[member] = None
        member.rooms[room.name] = room  # one name string per room, not per member
        if self.on_members is not None:
            self.on_members(room.key, len(room.members))
        return changes

    def leave(self, member, room_name: str) -> list[Change]:
        room = member.rooms.pop(room_name, None)
        if room is None:
            why = check_name(room_name, "room")
            if why:
                raise HubError(INVALID_NAME, why)
            return []  # not a member: idempotent
        del room.members[member]
        room.watchers.pop(member, None)
        if member.version < 2:
            room.legacy -= 1
        room.seq.pop(member, None)
        room.held.pop(member, None)
        if self.on_members is not None:
            self.on_members(room.key, len(room.members))
        if not room.members:
            del member.ns.rooms[room_name]
            return []
        if not room.watchers:
            return []
        return [Change(list(room.watchers), Presence(PRESENCE_LEAVE, room_name, member.nick))]

    def rename(self, member, new_nick: str) -> list[Change]:
        why = check_name(new_nick, "nick")
        if why:
            raise HubError(INVALID_NAME, why)
        ns = member.ns
        old = member.nick
        if new_nick == old:
            return []
        key = nick_key(new_nick)
        holder = ns.nicks.get(key)
        if holder is not None and holder is not member:
            raise HubError(NICK_TAKEN, _taken(new_nick, holder.nick, ns.name))
        # A change of case only (same key) is the same person: allowed.
        del ns.nicks[nick_key(old)]
        ns.nicks[key] = member
        member.nick = new_nick
        changes = []
        for room in member.rooms.values():
            watchers = [m for m in room.watchers if m is not member]
            if watchers:
                changes.append(Change(watchers, Presence(PRESENCE_NICK, room.name, old, new_nick)))
        return changes

    # ------------------------------------------------------------ queries
    def room_of(self, member, room_name: str) -> Room | None:
        return member.ns.rooms.get(room_name) if member.ns else None

    def who(self, member, room_name: str) -> list[str]:
        """Nicks of a room of the member's namespace, in join order."""
        why = check_name(room_name, "room")
        if why:
            raise HubError(INVALID_NAME, why)
        room = self.room_of(member, room_name)
        return [m.nick for m in room.members] if room else []

    def rooms(self, member, all_rooms: bool = False) -> list[tuple[str, int]]:
        source = member.ns.rooms if all_rooms else member.rooms
        return [(name, len(room.members)) for name, room in source.items()]

    def find(self, member, nick: str):
        """The member of ``member``'s namespace holding ``nick`` (any case), or None."""
        return member.ns.nicks.get(nick_key(nick))


def _taken(wanted: str, held: str, ns_name: str) -> str:
    if wanted == held:
        return f"nick {wanted!r} is taken in {ns_name}"
    return f"nick {wanted!r} is taken in {ns_name} (as {held!r}: nicks ignore case)"
