"""TrainerPublisher: what a trainer uses to push weights and step messages to rollout servers.

    async with TrainerPublisher("tcp://127.0.0.1:7501") as tp:
        await tp.publish_step(step=12, phase="train_start")
        report = await tp.push_weights(version=13, tensors=model.state_dict())

Sockets: a ROUTER at ``endpoint`` (receivers register, pull buckets, report outcomes) and a PUB at
``pub_endpoint`` (beacons, WeightsReady, StepMessage). Pushes wait for the *joined* receivers
(``weightsync/roster.py``). Beacons double as heartbeats; a receiver silent for ``lost_after_s``
is no longer counted (a push waiting on it fails at once, naming it).

A push: tensors are planned into buckets (``weightsync/layout.py``), announced, then moved by the
transport (``shm``: packed into a reused shared-memory arena and checksummed piece by piece before
the announcement; ``cuda_ipc``: CUDA tensors packed on their GPU into a reused CUDA arena exported
once and checksummed there, see ``weightsync/cuda_ipc.py``; ``inline``: each bucket packed on first
pull into a reused buffer, its checksum computed as it is packed and sent with it, served zero-copy;
``gloo``: broadcast tensor by tensor in a persistent group, see ``weightsync/broadcast.py``, the
buckets' checksums broadcast after the data), and the push returns when every joined receiver
reported the version applied, or raises ``PushError``. Source tensors must not change until
``push_weights`` returns (they are read while being served).

Trust (issue 14): with ``keys`` and ``receiver_keys`` the ROUTER and the PUB are CURVE servers in
the ``receivers`` domain (Ironhouse): only the listed servers complete a handshake, so strangers
can neither register, pull buckets, report outcomes nor hear announcements; receivers check this
trainer's public key, so a stranger bound at this endpoint cannot pass as the trainer. Who may
speak for which receiver id, with keys and without: ``weightsync/roster.py``. Under CURVE only
registered keys may pull.

Nothing a peer sends stops this trainer: an undecodable or unexpected message is a typed error to
its sender or a counted drop (``counters``). If the receiving task or the beacon task dies anyway,
the pending push and step calls fail at once with the reason, and so does every later call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, get_args

import msgspec
import torch
import zmq

from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import (
    Beacon,
    BeaconSeen,
    Leaving,
    PullBucket,
    Register,
    StepDone,
    StepMessage,
    StepPhase,
    VersionOutcome,
    WeightsReady,
    Welcome,
)
from rollwire.runtime.dispatch import handler_table, handles
from rollwire.runtime.logging import get_logger
from rollwire.transports import sockets
from rollwire.transports.pubsub import CONTROL_MAX_FRAME, Publisher
from rollwire.transports.receive import receive_loop
from rollwire.transports.security import RECEIVERS_DOMAIN, CurveServer, KeyPair
from rollwire.weightsync import broadcast, checksum, cuda_ipc, shm
from rollwire.weightsync.inline import InlineSender
from rollwire.weightsync.layout import NamedTensors, Sender, as_named_list, on_cpu, plan_buckets
from rollwire.weightsync.push import (
    Push,
    PushError,
    PushReport,
    Registered,
    choose_transport,
    collect,
)
from rollwire.weightsync.roster import ReceiverRoster
from rollwire.weightsync.steps import StepWaits
from rollwire.weightsync.trainer_link import TrainerLink

__all__ = ["PushError", "PushReport", "TrainerPublisher"]

log = get_logger("rollwire.trainer")
FAST_BEACON_S = 0.05  # while a registered receiver has not joined yet


def _check_number(what: str, value: object) -> None:
    """Versions and steps travel as msgpack integers: anything else would be announced, dropped by
    every server, and time out blaming them."""
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise TypeError(f"{what} must be an int in [0, 2**64), got {value!r} ({type(value).__name__})")


def default_pub_endpoint(endpoint: str) -> str:
    """tcp: the next port; ipc/inproc: the same name + "-pub"."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if not port.isdigit() or port == "0":
            raise ValueError(f"give pub_endpoint explicitly for {endpoint!r}")
        return f"tcp://{host}:{int(port) + 1}"
    return endpoint + "-pub"


class TrainerPublisher:
    def __init__(self, endpoint: str, *, pub_endpoint: str | None = None, bucket_bytes: int = 512 << 20,
                 credit_window: int = 4, timeout_s: float = 60.0, min_receivers: int = 1,
                 heartbeat_s: float = 1.0, lost_after_s: float = 10.0, broadcast_host: str | None = None,
                 keys: KeyPair | None = None, receiver_keys: Iterable[bytes] = (), max_receivers: int = 1024) -> None:
        """``keys``: this trainer's CURVE key pair; ``receiver_keys``: the public keys (z85) of the
        servers allowed to receive from it. Both or neither (see the module docstring).
        ``max_receivers``: registered receiver ids kept at most; beyond it a new one takes the place
        of the longest-silent registration that is not joined (silent for ``lost_after_s``; that
        receiver is told so at its next beacon acknowledgement and registers again), or is refused
        ``overloaded`` if all are live. Dead servers do not fill the roster for good, and a
        stranger's flood does not grow it without bound; without CURVE a stranger can still hold
        its slots (register and acknowledge beacons): only keys keep strangers out."""
        if bucket_bytes <= 0 or credit_window <= 0:
            raise ValueError("bucket_bytes and credit_window must be positive")
        allowed = frozenset(receiver_keys)
        if (keys is None) != (not allowed):
            raise ValueError("keys and receiver_keys go together (CURVE needs this trainer's key pair "
                             "and the servers it accepts)")
        if keys is not None and keys.secret is None:
            raise ValueError("the trainer's key pair needs its secret key")
        self._curve = CurveServer(keys, RECEIVERS_DOMAIN, allowed) if keys is not None else None
        self.counters: Counter[str] = Counter()  # drops and refusals of what peers sent
        self.endpoint = endpoint
        self.pub_endpoint = pub_endpoint or default_pub_endpoint(endpoint)
        self.bucket_bytes, self.credit_window = bucket_bytes, credit_window
        self.timeout_s, self.min_receivers, self.max_receivers = timeout_s, min_receivers, max_receivers
        self.heartbeat_s, self.lost_after_s = heartbeat_s, lost_after_s
        self.trainer_id = uuid.uuid4().hex  # new on every start: receivers notice and re-register
        self.host_id = shm.host_id()
        host = endpoint[len("tcp://"):].rpartition(":")[0] if endpoint.startswith("tcp://") else "127.0.0.1"
        self._broadcast_host = broadcast_host or (host if host not in ("*", "0.0.0.0", "") else "127.0.0.1")
        # the trainer half of each transport this process can use, fastest first
        self._senders: dict[str, Sender] = {}
        if cuda_ipc.available():
            self._senders["cuda_ipc"] = cuda_ipc.CudaIpcSender()
        if shm.available():
            self._senders["shm"] = shm.ShmSender()
        self._inline = self._senders["inline"] = InlineSender()
        if broadcast.available("gloo"):
            self._senders["gloo"] = broadcast.GlooSender(self._broadcast_host, timeout_s)
        if broadcast.available("nccl"):  # only when asked for; not run across two GPUs yet (issue 8)
            self._senders["nccl"] = broadcast.NcclSender(self._broadcast_host, timeout_s)
        self.transports = list(self._senders)
        self.roster = ReceiverRoster(curve=keys is not None, lost_after_s=lost_after_s, counters=self.counters)
        self._link: TrainerLink | None = None  # the ROUTER, once started
        self._pub: Publisher | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._dispatch = {t: getattr(self, attr) for t, attr in handler_table(type(self)).items()}
        self._wake_beacon = asyncio.Event()
        self._push: Push | None = None  # announced, until its outcomes are in
        self._pending: Push | None = None  # the push under way, from planning to its outcomes
        self._push_lock = asyncio.Lock()
        self._steps = StepWaits()
        self._last_version: int | None = None
        self._waited: dict[str, set[str]] = {}  # transport -> the receivers its last successful push waited for
        self._pack_buf = torch.empty(0, dtype=torch.uint8)  # inline: reused, so warm after the first push
        self._workers = ThreadPoolExecutor(2, thread_name_prefix="rw-trainer")
        self._closed = False
        self._dead: str | None = None  # why a background task died: every push and step fails with it

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> TrainerPublisher:
        router = await sockets.bind_when_free(
            lambda: sockets.router([self.endpoint], curve=self._curve, max_frame_bytes=CONTROL_MAX_FRAME,
                           zmtp_heartbeat=False))  # it sends buckets; beacons give liveness
        try:
            self._pub = await sockets.bind_when_free(lambda: Publisher(self.pub_endpoint, curve=self._curve))
        except Exception:
            sockets.close_router(router, linger_ms=0)
            raise
        self._link = TrainerLink(router, self._dispatch, self.counters, curve=self._curve is not None)
        self.pub_endpoint = self._pub.endpoint
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(receive_loop(router, self._link.on_frames, copy=False), name="trainer-recv"),
                       loop.create_task(self._beacon_loop(), name="trainer-beacon")]
        for task in self._tasks:
            task.add_done_callback(self._task_died)
        log.info("trainer_started", trainer_id=self.trainer_id, endpoint=self.endpoint, pub=self.pub_endpoint)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._link is not None:
            await self._link.close()
        if self._pending is not None:
            self._pending.fail_all("trainer closed")
        self._steps.fail("trainer closed")
        self.roster.changed.set()  # a call waiting for receivers to join ends now
        for sender in self._senders.values():
            sender.close()
        if self._pub is not None:
            self._pub.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _task_died(self, task: asyncio.Task[Any]) -> None:
        """A background task ended other than by close(): nothing would answer the receivers or
        see their outcomes. Fail what waits now, loudly, and every later call."""
        if self._closed:
            return
        exc = None if task.cancelled() else task.exception()
        self._dead = f"{task.get_name()} stopped: {exc!r}" if exc is not None else f"{task.get_name()} stopped"
        log.error("trainer_task_died", task=task.get_name(), error=repr(exc), exc_info=exc)
        if self._pending is not None:
            self._pending.fail_all(f"trainer broken: {self._dead}")
        self._steps.fail(f"trainer broken: {self._dead}")
        self.roster.changed.set()  # a push waiting for receivers to join fails now

    def _check_started(self) -> None:
        if self._pub is None:
            raise RuntimeError("TrainerPublisher is not started (use 'async with')")
        self._check_alive()  # closed (PushError, as for a call that was waiting when it closed)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise PushError("trainer", {"*": f"trainer broken: {self._dead}"})
        if self._closed:
            raise PushError("trainer", {"*": "trainer closed"})

    async def _publish(self, msg: Any) -> None:
        """On the PUB, unless the trainer closed or broke meanwhile (then ``PushError``)."""
        self._check_alive()
        assert self._pub is not None
        try:
            await self._pub.publish(msg)
        except zmq.ZMQError:
            self._check_alive()  # closed under the send: say so
            raise

    async def __aenter__(self) -> TrainerPublisher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _peers(self) -> TrainerLink:  # handlers run only once started, called by the link
        assert self._link is not None
        return self._link

    @property
    def receivers(self) -> dict[str, Registered]:
        """The registered receivers by id (``Registered.joined``: counted by pushes)."""
        return self.roster.receivers

    # -- public API ------------------------------------------------------------------------------
    async def publish_step(self, step: int, phase: StepPhase, *, wait: bool = True,
                           require_all: bool = True) -> list[str]:
        """Publish StepMessage to the joined receivers (waiting for ``min_receivers`` to join). With
        ``wait``, return once each server acted on it (colocated ``train_start``: memory released),
        or failed: a failure raises ``PushError``, unless ``require_all`` is off and some acted; a
        receiver lost meanwhile (no beacon acknowledged) fails at once. Returns those that acted."""
        self._check_started()
        _check_number("step", step)
        if phase not in get_args(StepPhase):
            raise ValueError(f"phase {phase!r} is not one of {get_args(StepPhase)}")
        self._check_alive()
        receivers = [r.receiver_id for r in await self._wait_joined()]
        if not wait:
            await self._publish(StepMessage(step=step, phase=phase))
            return receivers
        return await self._step(step, phase, receivers, require_all)

    async def _step(self, step: int, phase: StepPhase, receiver_ids: list[str], require_all: bool) -> list[str]:
        """Publish the step and wait (``timeout_s``) for each of ``receiver_ids`` to act on it."""
        futs = self._steps.expect(receiver_ids, step, phase)
        try:
            await self._publish(StepMessage(step=step, phase=phase))
            failures = await collect(futs, self.timeout_s)
        finally:
            self._steps.forget(futs, step, phase)
        if failures and (require_all or len(failures) == len(futs)):
            raise PushError(f"step {step} {phase}", failures)
        return sorted(set(futs) - set(failures))

    async def push_weights(self, version: int, tensors: NamedTensors, transport: str = "auto",
                           step: int | None = None, require_all: bool = True, barrier: bool = False) -> PushReport:
        """Push one weight version to every joined receiver; returns once each applied it or failed.
        ``require_all`` (default): any failure raises ``PushError`` naming each receiver and why.
        Without it (a fleet, where each server applies on its own) the report names the failed ones
        (``PushReport.failed``) and raises only if none applied. A receiver that did not answer within
        ``timeout_s`` is no longer counted as joined: later pushes do not wait for it until it
        acknowledges a beacon again. ``barrier`` (strictly on-policy): every server loads the version
        and stays paused until all have answered; then one ``barrier_release`` resumes them together
        (sent whatever the outcome; a server never released resumes at its own barrier timeout)."""
        self._check_started()
        _check_number("version", version)
        if step is not None:
            _check_number("step", step)
        self._check_alive()
        async with self._push_lock:
            if self._last_version is not None and version <= self._last_version:
                raise ValueError(f"version {version} is not above the last pushed version {self._last_version}")
            t0 = time.monotonic()
            named = as_named_list(tensors, to_cpu=False)
            receivers = await self._wait_joined()
            on_gpu = any(s.on_gpu for s in self._senders.values())
            device = cuda_ipc.tensors_device([t for _, t in named]) if on_gpu else None
            chosen = choose_transport(transport, self.transports, self.host_id, receivers,
                                      cuda_ipc.device_uuid(device) if device is not None else None)
            sender = self._senders[chosen]
            if sender.on_gpu:
                if device is None:
                    raise ValueError(f"transport {chosen!r} needs every tensor on one CUDA device")
                push_after = torch.cuda.Event()  # the packing waits for the caller's last write
                push_after.record(torch.cuda.current_stream(device))
            else:
                named = on_cpu(named)
            plans = plan_buckets(named, self.bucket_bytes)
            push = Push(version, plans, chosen, {r.receiver_id: asyncio.get_running_loop().create_future()
                                                  for r in receivers}, self._pack_buf)
            if sender.on_gpu:
                push.cuda_after, push.device = push_after, device
            if self._unwaited_readers(chosen):  # checked now, just before its bytes would be rewritten
                sender.unwaited()
            t_prepare = time.monotonic()
            self._pending = push  # a receiver lost or leaving while it is prepared fails for it at once
            try:
                try:
                    ready = await self._prepare(push, sender, step if step is not None else version, receivers)
                except OSError as e:  # /dev/shm too small (ENOSPC): "auto" means any transport that works
                    if transport != "auto" or chosen != "shm":
                        raise
                    log.warning("shm_unavailable_push_goes_inline", version=version, error=str(e)[:300])
                    chosen, sender = "inline", self._senders["inline"]
                    push = self._pending = Push(version, plans, chosen, push.outcomes, self._pack_buf)
                    ready = await self._prepare(push, sender, step if step is not None else version, receivers)
            except BaseException:
                self._pending = None
                push.abandon()
                raise
            if barrier:
                ready = msgspec.structs.replace(ready, barrier=True)
            prepare_s = time.monotonic() - t_prepare
            self._push = push
            answered = False  # the wait ended (not cancelled); with no failures the bytes may be reused
            failures: dict[str, str] = {}
            t_announce = time.monotonic()
            try:
                await self._publish(ready)
                self._last_version = version  # announced: even a failed push uses it up (some may apply it)
                sender.announced(push, self._workers, self.credit_window)
                failures = await push.wait(self.timeout_s)
                wait_s = time.monotonic() - t_announce
                for rid, why in failures.items():
                    if why.startswith("timed out") and rid in self.receivers:
                        self.receivers[rid].joined = False  # stalled: evicted until it acknowledges a beacon
                # receivers may answer before the trainer's own writing ends (a bad announcement, or
                # none to wait for): the arena is reused only after it, and its error is the push's
                await push.written()
                answered = True
            finally:
                self._push = self._pending = None
                self._pack_buf = push.served.pack_buf
                if not answered:
                    push.abandon()
                if not answered or failures:  # a receiver may still read the arena, or a group is broken
                    sender.failed()
                else:
                    self._waited[chosen] = set(push.outcomes)
                if barrier:  # every server has answered (or failed, or the push was cancelled): all resume
                    await self._release_barrier(version, sorted(set(push.outcomes) - set(failures)) if answered else [])
            if failures and (require_all or len(failures) == len(push.outcomes)):
                raise PushError(f"version {version}", failures)
            applied = sorted(set(push.outcomes) - set(failures))
            report = PushReport(version, time.monotonic() - t0, push.total_bytes, applied, chosen, prepare_s,
                                failed=failures, bytes_sent=push.bytes_sent, wait_s=wait_s)
            log.info("weights_pushed", version=version, transport=chosen, bytes=push.total_bytes,
                     seconds=round(report.seconds, 4), prepare_s=round(prepare_s, 4),
                     before_prepare_s=round(t_prepare - t0, 4), wait_s=round(wait_s, 4), receivers=len(receivers))
            return report

    # -- push internals --------------------------------------------------------------------------
    async def _release_barrier(self, version: int, applied: list[str]) -> None:
        """One ``barrier_release`` resumes the servers that hold the version. Acknowledgements are
        awaited only from those that applied it (none after a cancelled push: its caller is not
        kept); a server never released resumes at its own barrier timeout."""
        try:
            if applied:
                released = await self._step(version, "barrier_release", applied, require_all=False)
                log.info("barrier_released", version=version, receivers=len(released))
            else:
                await self._publish(StepMessage(step=version, phase="barrier_release"))
        except PushError as e:  # none acknowledged (or the trainer closed): each resumes at its timeout
            log.warning("barrier_release_unacknowledged", version=version, error=str(e)[:300])

    async def _prepare(self, push: Push, sender: Sender, step: int, receivers: Sequence[Registered]) -> WeightsReady:
        """Checksums and the payload (packing, an arena, a group) by the transport's trainer half, on
        worker threads, off the event loop."""
        sums, payload = await sender.prepare(push, [r.receiver_id for r in receivers], self._workers)
        push.metas = [p.meta(c) for p, c in zip(push.plans, sums, strict=True)]
        return WeightsReady(trainer_id=self.trainer_id, version=push.version, step=step, n_buckets=len(push.plans),
                            total_bytes=push.total_bytes, buckets=push.metas, payload=payload)

    def _unwaited_readers(self, transport: str) -> list[str]:
        """Live receivers registered on this host that the last push by ``transport`` did not wait
        for. Such a one may have heard that push's announcement (it registered during the push, or
        after it heard it, or it was evicted after a stall and came back) and still be reading its
        bytes, at its own pace. One silent for ``lost_after_s`` (a server killed without a word) is
        not reading."""
        waited = self._waited.get(transport, set())
        now = time.monotonic()
        return [rid for rid, r in self.receivers.items() if rid not in waited and r.host_id == self.host_id
                and now - r.last_seen <= self.lost_after_s]

    async def _wait_joined(self) -> list[Registered]:
        return await self.roster.wait_joined(self.min_receivers, self.timeout_s, self._check_alive)

    # -- what receivers send (TrainerLink hands each message here) ---------------------------
    @handles(PullBucket)
    async def _on_pull(self, peer: bytes, key: str, rid: int, msg: PullBucket) -> None:
        if self._curve is not None and not any(r.key == key for r in self.receivers.values()):
            self.counters["pulls_refused"] += 1
            await self._peers.refuse(peer, rid, ErrorCode.UNAUTHORIZED, "pull from a key no receiver registered")
            return
        await self._inline.serve_pull(self._push, peer, rid, msg, self._peers, self._workers, self.credit_window)

    @handles(VersionOutcome)
    def _on_outcome(self, peer: bytes, key: str, rid: int, msg: VersionOutcome) -> None:
        if self.roster.speaks_for(peer, msg.receiver_id, "outcomes") and self._push is not None:
            self._push.outcome(msg, self.trainer_id)

    @handles(StepDone)
    def _on_step_done(self, peer: bytes, key: str, rid: int, msg: StepDone) -> None:
        if self.roster.speaks_for(peer, msg.receiver_id, "step_acks"):
            self._steps.acknowledged(msg)

    @handles(Register)
    async def _on_register(self, peer: bytes, key: str, rid: int, msg: Register) -> None:
        welcome = Welcome(trainer_id=self.trainer_id, pub_endpoint=self.pub_endpoint, checksum=checksum.NAME)
        old = self.receivers.get(msg.receiver_id)
        if old is not None and old.peer == peer:  # a retry queued while we were away: same connection
            await self._peers.reply(peer, rid, welcome)
            return
        refusal = self.roster.refusal(msg, key, self._peers.connected, self.max_receivers)
        if refusal is not None:
            await self._peers.refuse(peer, rid, *refusal)
            return
        if old is not None:  # the receiver restarted: whatever it was staging or acting on is gone
            self._count_out(msg.receiver_id, "receiver re-registered (restarted) while it was waited for")
            for sender in self._senders.values():
                sender.forget(msg.receiver_id)
        self.roster.add(Registered(msg.receiver_id, peer, msg.host_id, list(msg.transports), msg.live_version,
                                   list(msg.cuda_devices), key=key), self.max_receivers)
        log.info("receiver_registered", receiver_id=msg.receiver_id, live_version=msg.live_version,
                 transports=msg.transports)
        self._wake_beacon.set()
        await self._peers.reply(peer, rid, welcome)

    @handles(Leaving)
    def _on_leaving(self, peer: bytes, key: str, rid: int, msg: Leaving) -> None:
        if not self.roster.leave(peer, msg.receiver_id):
            return
        self._count_out(msg.receiver_id, "left: its server is stopping")
        for sender in self._senders.values():
            sender.forget(msg.receiver_id)

    def _count_out(self, receiver_id: str, why: str) -> None:
        """A receiver no longer answers: the push and the step calls waiting on it fail for it now."""
        if self._pending is not None:
            self._pending.fail(receiver_id, why)
        self._steps.fail(why, receiver_id)

    @handles(BeaconSeen)
    def _on_beacon_seen(self, peer: bytes, key: str, rid: int, msg: BeaconSeen) -> Coroutine[Any, Any, None] | None:
        if msg.trainer_id != self.trainer_id:  # not our beacon (a previous trainer's, or made up)
            self.counters["beacon_acks_dropped"] += 1
            return None
        if self.roster.beacon_seen(peer, msg.receiver_id):
            return None
        # forgotten (room made for another, or the id taken over while it was silent), or never
        # ours: say so, and a real receiver registers again (the link runs it as a task)
        return self._peers.refuse(peer, rid, ErrorCode.UNAUTHORIZED, f"receiver id {msg.receiver_id[:100]!r} is "
                                  "not registered on this connection: register again")

    async def _beacon_loop(self) -> None:
        assert self._pub is not None
        seq = 0
        while True:
            seq += 1
            await self._pub.publish(Beacon(trainer_id=self.trainer_id, seq=seq))
            for lost, why in self.roster.newly_lost():
                self._count_out(lost, why)
            self._wake_beacon.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FAST_BEACON_S if self.roster.any_pending else self.heartbeat_s):
                    await self._wake_beacon.wait()
