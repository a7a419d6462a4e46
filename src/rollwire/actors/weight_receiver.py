"""WeightReceiverActor: stages one weight version at a time; only a whole, verified version goes on.

Talks to the trainer (``weightsync/publisher.py``) through a DEALER (register, pull buckets, report
outcomes) and a SUB (beacons, WeightsReady, StepMessage), and to the MemoryGovernor's "weights"
port (``apply_endpoint``) with LoadVersion and StepMessage. It has no port of its own.

Per announced version:

1. refused with BAD_VERSION if not above the live version (or the one being staged);
2. staged by its transport (``weightsync/``, one module per transport): inline buckets pulled under a credit
   window, or the shm arena attached, or the trainer's CUDA arena opened (cuda_ipc), or the
   broadcast joined; every bucket checked against the announcement (layout, size, checksum; cuda_ipc:
   a GPU checksum). A newer announcement, or one from a restarted trainer,
   supersedes a version still staging (SUPERSEDED); no progress for ``stall_timeout_s`` drops it
   (TIMEOUT). Either way the live version keeps serving;
3. resolved into tensors (``weightsync/staged.py``: views on the frames or arena, no copy) and
   handed whole to the governor as one ``LoadVersion``; it has the GenerationActor pause, load and
   resume in one handler (the engine refuses unknown names, wrong shapes or dtypes before copying
   anything); cuda_ipc: the GPU is synchronized after the load, so no copy out of the trainer's
   arena is still running when the trainer hears "applied";
4. reported to the trainer as VersionOutcome (ok, or the error code and message).

Beacons: each one is acknowledged (that proves this SUB receives, and is the heartbeat); a beacon
or announcement carrying a new trainer_id means the trainer restarted: register again.

The trainer link is untrusted input. Nothing the trainer (or whoever answers at its endpoint)
sends can stop this actor: an undecodable or unexpected reply or announcement is a counted, logged
drop (``bad_replies``, ``bad_announcements``); a link whose receiving task died is replaced and the
receiver registers again (``link_failures``); a bad bucket fails only its version (typed outcome).
Sockets: the control DEALER (register, beacons seen, outcomes, step acks) and the SUB take small
frames (``CONTROL_MAX_FRAME``, ``ANNOUNCEMENT_MAX_FRAME``); buckets come on a DEALER of their own,
one per inline version, whose frame limit is that version's largest announced bucket (at most
``BUCKET_MAX_FRAME``). With ``curve`` (the server's keys and the trainer's public key) every one of
them is a CURVE client that completes its handshake only with the trainer holding that key: a
stranger bound at the trainer's endpoints is never heard, so its pushes and step messages never
reach the governor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar
from urllib.parse import urlparse

from rollwire.messages import (
    ControlReply,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    RemoteError,
    RollwireError,
    VersionApplied,
)
from rollwire.messages.weights import (
    PAYLOAD_TYPES,
    Beacon,
    BeaconSeen,
    Leaving,
    LoadVersion,
    Register,
    StepDone,
    StepMessage,
    TrainerAnnouncement,
    TrainerReply,
    VersionOutcome,
    WeightsReady,
    Welcome,
)
from rollwire.runtime import Actor, Port
from rollwire.transports.pubsub import ANNOUNCEMENT_MAX_FRAME, CONTROL_MAX_FRAME, Subscriber
from rollwire.transports.rpc import ConnectionClosed, RpcClient
from rollwire.transports.security import CurveClient
from rollwire.weightsync import checksum, cuda_ipc, shm
from rollwire.weightsync.broadcast import BroadcastReceiver
from rollwire.weightsync.broadcast import available as broadcast_available
from rollwire.weightsync.cuda_ipc import CudaIpcStager
from rollwire.weightsync.inline import InlineStager
from rollwire.weightsync.layout import LayoutError, Stager, StagingError, check_layout
from rollwire.weightsync.shm import ShmStager
from rollwire.weightsync.staged import STAGED, StagedVersion, forget_views, resolve

WEIGHT_RECEIVER = "weight_receiver"
REGISTER_TIMEOUT_S = 2.0
MAX_REGISTER_WAIT_S = 30.0
LINK_RETRY_S = 0.5  # after the trainer link failed, before it is rebuilt
LEAVING_SEND_S = 1.0  # stopping: how long the goodbye to the trainer may wait at the high-water mark
TRAINER_SILENCE_S = 15.0  # no beacon for this long (trainers beat every second): register again


def _pub_address(pub_endpoint: str, trainer_endpoint: str) -> str:
    """A PUB bound to a wildcard is reached at the host we reach the trainer at."""
    url = urlparse(pub_endpoint)
    if url.scheme == "tcp" and url.hostname in (None, "*", "0.0.0.0"):
        host = urlparse(trainer_endpoint).hostname or "127.0.0.1"
        return f"tcp://{host}:{url.port}"
    return pub_endpoint


class _Version:
    """One announced version on its way through this actor."""

    def __init__(self, ready: WeightsReady) -> None:
        self.ready = ready
        self.received = time.monotonic()
        self.applying = False  # handed to the governor: no longer cancelled by a newer version
        self.task: asyncio.Task[None] | None = None


class WeightReceiverActor(Actor):
    ports: ClassVar[dict[str, Port]] = {}  # none: it talks through its own DEALER and SUB

    def __init__(self, trainer_endpoint: str, *, receiver_id: str, apply_endpoint: str,
                 stall_timeout_s: float = 30.0,
                 transports: Sequence[str] = ("cuda_ipc", "shm", "inline", "gloo", "nccl"),
                 credit_window: int = 4, apply_timeout_s: float = 600.0, live_version: int = 0,
                 engine_device: str | None = None, coalesce: bool = False, name: str = WEIGHT_RECEIVER,
                 verify_on_load: bool = False,
                 curve: CurveClient | None = None, register_timeout_s: float = REGISTER_TIMEOUT_S,
                 trainer_silence_s: float = TRAINER_SILENCE_S) -> None:
        """``curve``: this server's key pair and the trainer's public key (CURVE on every trainer
        socket; see the module docstring). ``engine_device``: where the engine keeps its weights
        ("cpu", "cuda:0"...); cuda_ipc is offered only if this process has CUDA and that is a CUDA
        device (None: any engine of a CUDA process, since every engine takes CUDA tensors).
        ``coalesce``: of the versions announced while one is being loaded, only the newest waits
        (the others get SUPERSEDED); without it they all wait and load in order.
        ``verify_on_load``: the engine copies shm bytes itself and verifies them as it copies (the
        hf engine on a CPU), so shm buckets are not hashed here first (``ShmStager``)."""
        super().__init__(name)
        self.trainer_endpoint = trainer_endpoint
        self.receiver_id = receiver_id
        self.apply_endpoint = apply_endpoint
        self.stall_timeout_s = stall_timeout_s
        offers = {"shm": shm.available(), "cuda_ipc": cuda_ipc.receiver_offers(engine_device),
                  "nccl": cuda_ipc.receiver_offers(engine_device) and broadcast_available("nccl")}
        self.transports = [t for t in transports if offers.get(t, True)]
        self.cuda_devices = cuda_ipc.visible_uuids() if "cuda_ipc" in self.transports else []
        self.credit_window = credit_window
        self.apply_timeout_s = apply_timeout_s
        self.live_version = live_version
        self.trainer_id = ""
        self._trainer: RpcClient[Any] | None = None
        self._sub: Subscriber[Any] | None = None
        self._current: _Version | None = None
        self.coalesce = coalesce
        self._queued: deque[_Version] = deque()  # announced while the current one loads, oldest first
        self._verify_pool = ThreadPoolExecutor(2, thread_name_prefix="rw-verify")
        broadcast = BroadcastReceiver(receiver_id)
        stagers: dict[str, Stager] = {
            "inline": InlineStager(trainer_endpoint, curve=curve, window=credit_window, counters=self.counters),
            "shm": ShmStager(verify_on_load), "cuda_ipc": CudaIpcStager(), "gloo": broadcast, "nccl": broadcast}
        # the receiver half of every transport offered, by the payload type that announces it
        self._stagers = {PAYLOAD_TYPES[t]: stagers[t] for t in self.transports if t in PAYLOAD_TYPES}
        self._broadcast = broadcast
        self._stopping = False
        self._said_goodbye = False  # Leaving sent: the trainer forgot us, send nothing more
        self._forgotten = False  # the trainer said it does not count us: register again
        self.curve = curve
        self.register_timeout_s = register_timeout_s  # first wait for a Welcome, and first pause after a refusal
        self.trainer_silence_s = trainer_silence_s  # the PUB silent this long: the trainer (or its Welcome) was wrong

    def _control_link(self) -> RpcClient[Any]:
        link: RpcClient[Any] = RpcClient(self.trainer_endpoint, TrainerReply, curve=self.curve,
                                         max_frame_bytes=CONTROL_MAX_FRAME)
        link.unsolicited = self._trainer_notice
        return link

    def _trainer_notice(self, msg: Any) -> None:
        """The trainer answered a beacon acknowledgement: it no longer counts us (forgotten to make
        room, or our id taken over while we were silent). Register again at the next beacon."""
        if isinstance(msg, ErrorReply) and msg.code == ErrorCode.UNAUTHORIZED:
            if not self._forgotten:
                self.log.warning("trainer_forgot_us", reason=msg.message[:300])
            self._forgotten = True
            self.counters.inc("forgotten_by_trainer")
        else:
            self.counters.inc("bad_replies")

    async def on_start(self) -> None:
        self._trainer = self._control_link()
        self._sub = Subscriber(TrainerAnnouncement, curve=self.curve, max_frame_bytes=ANNOUNCEMENT_MAX_FRAME)
        self.spawn(self._listen(), name=f"{self.name}:listen")

    async def on_stop(self) -> None:
        self._stopping = True  # a version cancelled now must not start the queued one
        if self._trainer is not None:
            if self.trainer_id:  # registered: the trainer stops counting on us now, not after silence
                self._said_goodbye = True  # nothing from the listening task may follow the goodbye
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._trainer.send(0, Leaving(receiver_id=self.receiver_id)), LEAVING_SEND_S)
            await self._trainer.close()
        if self._sub is not None:
            self._sub.close()
        self._broadcast.close()
        self._verify_pool.shutdown(wait=False, cancel_futures=True)
        forget_views()  # the last arena's mapping goes with them

    # -- the trainer link ------------------------------------------------------------------------
    async def _register(self) -> None:
        """Register until the trainer answers; then follow its PUB."""
        assert self._trainer is not None and self._sub is not None
        # The DEALER queues a Register until the trainer is up, so one is enough while it starts;
        # resending (with a growing wait) only covers a trainer that died before answering.
        wait = self.register_timeout_s
        while True:
            msg = Register(receiver_id=self.receiver_id, host_id=shm.host_id(), transports=self.transports,
                           live_version=self.live_version, cuda_devices=self.cuda_devices,
                           checksums=[checksum.NAME])
            pause = wait
            try:
                reply = await self._trainer.call(msg, timeout=wait)
                welcome = reply.msg
                if isinstance(welcome, Welcome) and welcome.checksum == checksum.NAME:
                    try:
                        pub = _pub_address(welcome.pub_endpoint, self.trainer_endpoint)
                        self._sub.connect(pub)
                        break
                    except ValueError as e:  # not an endpoint ZeroMQ can connect to
                        self.counters.inc("bad_replies")
                        self.log.warning("register_bad_welcome", pub=welcome.pub_endpoint[:200], error=str(e))
                elif isinstance(welcome, Welcome):  # an older trainer: every push would fail its checks
                    self.log.error("trainer_incompatible", trainer_id=welcome.trainer_id,
                                   reason=f"its buckets carry checksum {welcome.checksum or 'crc32'!r}, "
                                          f"this receiver verifies {checksum.NAME!r}: run the same rollwire")
                else:
                    self.counters.inc("bad_replies")
                    self.log.warning("register_unexpected_reply", kind=type(welcome).__name__)
            except TimeoutError:
                wait = min(MAX_REGISTER_WAIT_S, wait * 2)
                continue
            except RemoteError as e:  # e.g. unauthorized: our id is held by a live connection
                self.log.warning("register_refused", code=e.code.value, reason=e.message[:500])
                if e.retry_after_s > 0:
                    pause = min(wait, e.retry_after_s)
            except ProtocolError as e:  # an undecodable reply to our Register: dropped, counted
                self.counters.inc("bad_replies")
                self.log.warning("register_bad_reply", code=e.code.value, reason=e.message[:200])
            except ConnectionClosed as e:  # the link's receiving task died: a fresh link
                await self._replace_link(e)
            await asyncio.sleep(pause)
            wait = min(MAX_REGISTER_WAIT_S, wait * 2)
        if self.trainer_id and welcome.trainer_id != self.trainer_id:
            self.counters.inc("trainer_restarts_seen")
        self.trainer_id = welcome.trainer_id
        self.counters.inc("registrations")
        self.log.info("registered", trainer_id=self.trainer_id, pub=pub)

    async def _replace_link(self, why: BaseException) -> None:
        """The control link's receiving task died (ZeroMQ, or a decoder that raised): close it and
        start a fresh DEALER (a new connection; the trainer takes our next Register as a restart)."""
        self.counters.inc("link_failures")
        self.log.warning("trainer_link_replaced", error=repr(why)[:300])
        old, self._trainer = self._trainer, self._control_link()
        if old is not None:
            await old.close()

    async def _send(self, msg: Any) -> None:
        """A message to the trainer that has no reply; a dead link is replaced, never raised."""
        assert self._trainer is not None
        if self._said_goodbye:
            return
        try:
            await self._trainer.send(0, msg)
        except ConnectionClosed as e:
            self.counters.inc("sends_lost")
            await self._replace_link(e)

    async def _listen(self) -> None:
        """Register, then follow the PUB. Whatever goes wrong on the link is logged and counted and
        the link starts over: nothing a peer sends reaches the supervisor."""
        assert self._sub is not None
        while True:
            try:
                await self._register()
                while True:
                    msg = await self._sub.recv(timeout=self.trainer_silence_s)
                    if msg is None:  # no beacon: a dead trainer, or a Welcome that named a PUB nobody serves
                        self.counters.inc("trainer_silent")
                        self.log.warning("trainer_silent", seconds=self.trainer_silence_s, pub=self._sub.endpoint)
                        await self._register()
                        continue
                    await self._on_announcement(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self._replace_link(e)
                await asyncio.sleep(LINK_RETRY_S)

    async def _on_announcement(self, msg: Any) -> None:
        match msg:
            case Beacon():
                if msg.trainer_id != self.trainer_id:
                    self.log.info("trainer_changed", old=self.trainer_id, new=msg.trainer_id)
                    await self._register()
                elif self._forgotten:
                    self._forgotten = False
                    await self._register()
                if msg.trainer_id == self.trainer_id:
                    await self._send(BeaconSeen(receiver_id=self.receiver_id, trainer_id=self.trainer_id,
                                                seq=msg.seq))
            case WeightsReady():
                if msg.trainer_id != self.trainer_id:
                    await self._register()
                if msg.trainer_id != self.trainer_id:  # not the trainer we registered with: its pulls would fail
                    self.counters.inc("bad_announcements")
                    self.log.warning("announcement_from_other_trainer", version=msg.version,
                                     trainer_id=msg.trainer_id[:40], registered=self.trainer_id)
                    return
                self._on_weights_ready(msg)
            case StepMessage():
                self.spawn(self._forward_step(msg))
            case _:
                self.counters.inc("bad_announcements")

    async def _report(self, ready: WeightsReady, ok: bool, code: str = "", message: str = "",
                      seconds: float = 0.0) -> None:
        await self._send(VersionOutcome(receiver_id=self.receiver_id, version=ready.version, ok=ok,
                                        error_code=code, message=message, seconds=seconds,
                                        trainer_id=ready.trainer_id))

    def _reject(self, ready: WeightsReady, code: ErrorCode, message: str) -> None:
        self.counters.inc(f"rejected_{code.value}")
        self.log.warning("version_rejected", version=ready.version, code=code.value, reason=message)
        self.spawn(self._report(ready, False, code.value, message))

    # -- versions --------------------------------------------------------------------------------
    def _on_weights_ready(self, ready: WeightsReady) -> None:
        self.counters.inc("announcements")
        if ready.version <= self.live_version:
            self._reject(ready, ErrorCode.BAD_VERSION, f"version {ready.version} is not above the live version "
                                                       f"{self.live_version}")
            return
        cur = self._current
        if cur is None:
            self._start(_Version(ready))
            return
        last = self._queued[-1].ready if self._queued else cur.ready
        if ready.trainer_id == last.trainer_id and ready.version <= last.version:
            self._reject(ready, ErrorCode.BAD_VERSION, f"version {ready.version} is not above version "
                                                       f"{last.version}, already in progress")
        elif not cur.applying:  # still pulling: the newer version replaces it (and any waiting behind it)
            assert cur.task is not None
            cur.task.cancel()
            for old in [cur, *self._queued]:
                self._reject(old.ready, ErrorCode.SUPERSEDED, f"superseded by version {ready.version} "
                                                              f"from trainer {ready.trainer_id[:8]}")
            self._queued.clear()
            self._start(_Version(ready))
        else:  # being loaded: the announcement waits its turn (with --coalesce, only the newest waits)
            for old in [q for q in self._queued if self.coalesce or q.ready.trainer_id != ready.trainer_id]:
                # another trainer's waiting versions: it was restarted, and its successor serves the pulls now
                why = "(--coalesce)" if old.ready.trainer_id == ready.trainer_id else \
                    f"from trainer {ready.trainer_id[:8]} (trainer {old.ready.trainer_id[:8]} was replaced)"
                self._reject(old.ready, ErrorCode.SUPERSEDED, f"superseded by version {ready.version} {why}")
                self._queued.remove(old)
            self._queued.append(_Version(ready))
        self.counters.set("versions_waiting", len(self._queued))

    def _start(self, v: _Version) -> None:
        self._current = v
        v.task = self.spawn(self._run_version(v), name=f"{self.name}:v{v.ready.version}")

    def _finished(self, v: _Version) -> None:
        if self._current is not v or self._stopping:
            return  # superseded (the newer version is already running), or shutting down
        self._current = None
        while self._queued:
            nxt = self._queued.popleft()
            self.counters.set("versions_waiting", len(self._queued))
            if nxt.ready.trainer_id != self.trainer_id:  # its trainer was replaced since: nobody serves its pulls
                self._reject(nxt.ready, ErrorCode.SUPERSEDED, f"trainer {nxt.ready.trainer_id[:8]} was replaced "
                                                              f"by {self.trainer_id[:8]}")
            elif nxt.ready.version > self.live_version:
                self._start(nxt)
                return
            else:
                self._reject(nxt.ready, ErrorCode.BAD_VERSION, f"version {nxt.ready.version} is not above the "
                                                               f"live version {self.live_version}")

    async def _run_version(self, v: _Version) -> None:
        ready = v.ready
        stager = self._stagers.get(type(ready.payload))
        try:
            if stager is None:
                raise StagingError(ErrorCode.BAD_FIELD, f"transport {ready.transport!r} not offered by this receiver "
                                                        f"({self.transports})")
            tensors, payload, where = await self._stage(ready, stager)
            staged = time.monotonic()
            v.applying = True
            key = STAGED.put(StagedVersion(ready.version, resolve(tensors, payload, where), ready.total_bytes,
                                            stager.deferred_checks(ready)))
            t_apply = time.monotonic()
            try:
                applied = await self._apply(LoadVersion(version=ready.version, step=ready.step, staged=key,
                                                        hold=ready.barrier), stager)
            finally:
                STAGED.discard(key)  # the views (and the frames they hold) go once the governor answered
            t_after = time.monotonic()
            if type(stager).after_load is not Stager.after_load:  # a thread hop only where there is work
                await asyncio.get_running_loop().run_in_executor(self._verify_pool, stager.after_load)
            self.live_version = ready.version
            seconds = time.monotonic() - v.received
            self.counters.inc("versions_applied")
            self.counters.set("live_version", ready.version)
            self.log.info("version_applied", version=ready.version, transport=ready.transport,
                          bytes=ready.total_bytes, seconds=round(seconds, 4), stage_s=round(staged - v.received, 4),
                          resolve_s=round(t_apply - staged, 4), apply_s=round(t_after - t_apply, 4),
                          after_load_s=round(time.monotonic() - t_after, 4), pause_s=round(applied.pause_s, 4),
                          load_s=round(applied.load_s, 4))
            await self._report(ready, True, seconds=seconds)
        except StagingError as e:
            if stager is not None:
                stager.failed()
            if e.code == ErrorCode.TIMEOUT:
                self.counters.inc("versions_stalled")
            self._reject(ready, e.code, e.message)
        except Exception as e:  # an announcement no check above foresaw: it costs its version, not the actor
            self.log.error("version_failed", version=ready.version, error=repr(e)[:300], exc_info=e)
            if stager is not None:
                stager.failed()
            self._reject(ready, ErrorCode.INTERNAL, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            self._finished(v)

    async def _stage(self, ready: WeightsReady, stager: Stager) -> tuple[list[Any], list[Any], dict[str, str]]:
        """The version's tensors, its payload frames, and where the tensors' offsets point
        (``shm_name`` or ``cuda_arena``; none for frames): ``staged.resolve`` makes them tensors."""
        try:
            check_layout(ready)
        except LayoutError as e:
            raise StagingError(ErrorCode.BAD_FIELD, f"announcement does not add up: {e}") from None
        return await stager.stage(ready, self._verify_pool, self.stall_timeout_s)

    async def _apply(self, msg: LoadVersion, stager: Stager) -> VersionApplied:
        """The governor loads it (pause, copy, resume); its typed refusal is this version's outcome."""
        try:
            reply = await self.peer(self.apply_endpoint, ControlReply).call(msg, timeout=self.apply_timeout_s)
        except TimeoutError:
            stager.load_timed_out()  # the engine may still be reading the staged bytes
            raise StagingError(ErrorCode.TIMEOUT,
                               f"the governor did not answer within {self.apply_timeout_s}s") from None
        except RollwireError as e:  # its refusal (RemoteError), or a reply that did not decode
            raise StagingError(e.code, e.message if isinstance(e, RemoteError) else f"governor: {e.message}") from None
        if not isinstance(reply.msg, VersionApplied):
            raise StagingError(ErrorCode.INTERNAL, f"governor answered {type(reply.msg).__name__}")
        return reply.msg

    # -- step messages ---------------------------------------------------------------------------
    async def _forward_step(self, msg: StepMessage) -> None:
        self.counters.inc(f"step_{msg.phase}")
        code, why = "", ""
        try:
            await self.peer(self.apply_endpoint, ControlReply).call(msg, timeout=self.apply_timeout_s)
        except TimeoutError:
            code, why = ErrorCode.TIMEOUT.value, f"the governor did not answer within {self.apply_timeout_s}s"
        except RollwireError as e:  # its refusal (RemoteError), or a reply that did not decode
            code, why = e.code.value, e.message
        await self._send(StepDone(receiver_id=self.receiver_id, step=msg.step, phase=msg.phase, ok=not code,
                                  error_code=code, message=why))
