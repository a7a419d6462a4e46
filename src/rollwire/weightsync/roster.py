"""ReceiverRoster: the rollout servers a trainer knows, which of them speak for which receiver id,
and which are joined (counted, and so waited for, by pushes and step messages).

Trust (issue 14). Under CURVE only the servers whose keys the trainer lists complete a handshake,
and a receiver id belongs to the key that first registered it: another key claiming it is refused
(UNAUTHORIZED), also after it left (for the newest ``max_receivers`` ids no longer registered); the
same key registering again is that server restarted.
Without keys, a Register for a known id from a new connection is a restart only if the old
connection is gone (a send to it fails) or lost (no beacon acknowledged for ``lost_after_s``);
while the old one is alive it is refused (UNAUTHORIZED, retry_after_s), so a squatter cannot take a
live receiver's place silently. Outcomes, step acknowledgements and beacon acknowledgements count
only from the connection that registered the receiver id they name (others are counted and
dropped).

Joining: a receiver counts as joined only once it acknowledged a beacon it received on the
trainer's PUB (a SUB that has not joined yet would silently miss an announcement); one silent for
``lost_after_s`` is lost, and joins again with its next acknowledgement. One that says it is
leaving (its server stops) is forgotten at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable

from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import Register
from rollwire.runtime.logging import get_logger
from rollwire.weightsync import checksum
from rollwire.weightsync.push import PushError, Registered

log = get_logger("rollwire.trainer")
REREGISTER_RETRY_S = 1.0  # told to a Register refused because its id is held by a live connection
MAX_RECEIVER_ID = 512  # characters: ids are kept, logged and reported (a server's default: host:pid)
Refusal = tuple[ErrorCode, str, float]  # code, why, retry_after_s: the ErrorReply a refused Register gets


class ReceiverRoster:
    def __init__(self, *, curve: bool, lost_after_s: float, counters: Counter[str]) -> None:
        self.receivers: dict[str, Registered] = {}
        # CURVE: receiver id -> the key that registered it (kept after it leaves, see ``add``)
        self.owners: dict[str, str] = {}
        self.curve, self.lost_after_s, self.counters = curve, lost_after_s, counters
        self.changed = asyncio.Event()  # a receiver joined (or the trainer broke: waiters look again)

    def refusal(self, msg: Register, key: str, connected: Callable[[bytes], bool], at_most: int) -> Refusal | None:
        """Why ``msg`` (from a new connection, CURVE key ``key``) must be refused, or None: admit it
        (``add``). Making room for it (``make_room``) comes last: a refused one evicts none."""
        if checksum.NAME not in msg.checksums:  # an older receiver: every push would fail its checks
            why = (f"receiver {msg.receiver_id!r} verifies {', '.join(msg.checksums) or 'crc32'} bucket checksums, "
                   f"this trainer sends {checksum.NAME!r}: run the same rollwire on both ends")
            log.error("receiver_incompatible", receiver_id=msg.receiver_id[:100], reason=why)
            return ErrorCode.UNSUPPORTED_PROTOCOL, why, 0.0
        refusal: Refusal | None = None
        old = self.receivers.get(msg.receiver_id)
        if not 0 < len(msg.receiver_id) <= MAX_RECEIVER_ID:
            refusal = ErrorCode.BAD_FIELD, f"receiver_id: 1 to {MAX_RECEIVER_ID} characters", 0.0
        elif (claim := self.claim_refused(old, key, connected) if old is not None
              else self.key_refused(msg.receiver_id, key)) is not None:
            log.warning("register_refused", receiver_id=msg.receiver_id[:100], reason=claim)
            refusal = ErrorCode.UNAUTHORIZED, claim, 0.0 if self.curve else REREGISTER_RETRY_S
        elif old is None and not self.make_room(at_most):
            refusal = (ErrorCode.OVERLOADED, f"{len(self.receivers)} receivers are registered and live "
                       "(max_receivers)", REREGISTER_RETRY_S)
        if refusal is not None:
            self.counters["registrations_refused"] += 1
        return refusal

    def claim_refused(self, old: Registered, key: str, connected: Callable[[bytes], bool]) -> str | None:
        """Why a Register for ``old``'s id from another connection (CURVE key ``key``) must not
        replace it; None: it is ``old`` restarted, or ``old`` is gone. ``connected(peer)``: whether a
        connection still takes sends."""
        if self.curve:
            return self.key_refused(old.receiver_id, key)
        if not old.joined and time.monotonic() - old.last_seen > self.lost_after_s:
            return None  # lost: no beacon acknowledged for lost_after_s
        if not connected(old.peer):
            return None
        return f"receiver id {old.receiver_id!r} is held by a live connection"

    def key_refused(self, receiver_id: str, key: str) -> str | None:
        """CURVE: why ``key`` may not register ``receiver_id`` (another key did first), or None."""
        if self.curve and self.owners.get(receiver_id, key) != key:
            return f"receiver id {receiver_id!r} belongs to another server's key"
        return None

    def add(self, registered: Registered, at_most: int) -> None:
        """An accepted registration. Under CURVE its key owns the id from now on, also after it
        leaves or is forgotten, for up to ``at_most`` such ids beyond the registered ones (the
        longest unregistered go first: a listed key churning made-up ids cannot grow this without
        bound)."""
        rid = registered.receiver_id
        self.receivers[rid] = registered
        if not self.curve:
            return
        self.owners.pop(rid, None)
        self.owners[rid] = registered.key  # insertion order: the most recently registered last
        excess = len(self.owners) - len(self.receivers) - at_most
        for old in [r for r in self.owners if r not in self.receivers][:max(0, excess)]:
            del self.owners[old]

    def make_room(self, at_most: int) -> bool:
        """Below ``at_most`` registrations, forgetting the longest-silent one that is not joined and
        has been silent for ``lost_after_s`` if needed (a lost or never-joined server, or a stranger's
        made-up id); False if every registration is live."""
        if len(self.receivers) < at_most:
            return True
        now = time.monotonic()
        stale = [r for r in self.receivers.values() if not r.joined and now - r.last_seen > self.lost_after_s]
        if not stale:
            return False
        gone = min(stale, key=lambda r: r.last_seen)
        del self.receivers[gone.receiver_id]
        log.info("receiver_forgotten", receiver_id=gone.receiver_id[:100], reason="room for a new registration")
        return True

    def speaks_for(self, peer: bytes, receiver_id: str, what: str) -> bool:
        """Only the connection that registered ``receiver_id`` speaks for it; others' ``what`` is
        counted and dropped."""
        r = self.receivers.get(receiver_id)
        if r is not None and r.peer == peer:
            return True
        self.counters[f"{what}_dropped"] += 1
        # the first of each kind is a warning; a flood of forged ones must not flood the log too
        (log.debug if self.counters[f"{what}_dropped"] > 1 else log.warning)(
            "message_not_from_registered_receiver", kind=what, receiver_id=receiver_id[:100])
        return False

    def beacon_seen(self, peer: bytes, receiver_id: str) -> bool:
        """False if ``peer`` does not speak for ``receiver_id`` (a stale connection, or a stranger:
        counted, dropped)."""
        if not self.speaks_for(peer, receiver_id, "beacon_acks"):
            return False
        r = self.receivers[receiver_id]
        r.last_seen = time.monotonic()
        if not r.joined:
            r.joined = True
            log.info("receiver_joined", receiver_id=r.receiver_id)
            self.changed.set()
        return True

    def leave(self, peer: bytes, receiver_id: str) -> bool:
        """The receiver said it is stopping: forgotten now (its id is free for its successor).
        False if ``peer`` does not speak for it (counted, dropped)."""
        if not self.speaks_for(peer, receiver_id, "leaves"):
            return False
        del self.receivers[receiver_id]
        log.info("receiver_left", receiver_id=receiver_id)
        return True

    def newly_lost(self) -> list[tuple[str, str]]:
        """Joined receivers silent for ``lost_after_s``, now no longer joined: (receiver id, why)."""
        now = time.monotonic()
        lost = []
        for r in self.receivers.values():
            if r.joined and now - r.last_seen > self.lost_after_s:
                r.joined = False
                log.warning("receiver_lost", receiver_id=r.receiver_id, silent_s=round(now - r.last_seen, 1))
                lost.append((r.receiver_id, f"lost: no heartbeat for {now - r.last_seen:.1f}s"))
        return lost

    @property
    def any_pending(self) -> bool:
        """Some registered receiver has not joined yet (beacons go out faster until it does)."""
        return any(not r.joined for r in self.receivers.values())

    async def wait_joined(self, at_least: int, timeout_s: float, check_alive: Callable[[], None]) -> list[Registered]:
        """The joined receivers (sorted by id) once ``at_least`` joined, within ``timeout_s``;
        ``check_alive`` raises if the trainer broke meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            check_alive()
            joined = [r for r in self.receivers.values() if r.joined]
            if len(joined) >= at_least:
                return sorted(joined, key=lambda r: r.receiver_id)
            left = deadline - time.monotonic()
            if left <= 0:
                raise PushError("join", {"*": f"{len(joined)} receiver(s) joined within {timeout_s}s, "
                                              f"need {at_least} (registered: {sorted(self.receivers)})"})
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()
