"""The inline transport: weight buckets as ZeroMQ frames, pulled by the receiver under a credit window.

Tensors as payload frames: the body carries ``TensorRef``s, the bytes travel beside it.

Encoding hands ZeroMQ a memoryview of the tensor's own storage (no copy; the tensor must stay
alive and unchanged until the send completes, which ``sockets.send(copy=False)`` awaits).
Decoding builds a tensor *view* on the received frame: it keeps that frame's buffer alive and
is read-only in spirit (torch cannot mark it so); ``.clone()`` it to own a writable copy.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch

from rollwire.messages.codec import Buffer, ProtocolError
from rollwire.messages.envelope import TensorRef
from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.messages.weights import (
    INBAND,
    BucketData,
    InlinePayload,
    NamedTensor,
    Payload,
    PullBucket,
    TrainerReply,
    WeightsReady,
)
from rollwire.transports.pubsub import CONTROL_MAX_FRAME
from rollwire.transports.rpc import ConnectionClosed, RpcClient
from rollwire.transports.security import CurveClient
from rollwire.transports.sockets import BUCKET_MAX_FRAME
from rollwire.weightsync.checksum import Hasher
from rollwire.weightsync.layout import (
    BucketPlan,
    Sender,
    Staged,
    Stager,
    StagingError,
    Where,
    as_frames,
    byte_view,
    check_bucket,
    dtype_from_name,
    dtype_name,
    pack_with_checksum,
    packed_offsets,
    raise_problems,
    tensor_bytes,
)
from rollwire.weightsync.memcopy import copy_pool, copy_threads
from rollwire.weightsync.trainer_link import TrainerLink


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor, zero-copy when it is already contiguous."""
    if t.device.type != "cpu":
        raise ValueError(f"tensor on {t.device} cannot be sent as frames; move it to CPU first")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_tensors(tensors: Sequence[torch.Tensor], first_frame: int = 0) -> tuple[list[TensorRef], list[memoryview]]:
    refs, bufs = [], []
    for i, t in enumerate(tensors):
        refs.append(TensorRef(first_frame + i, dtype_name(t.dtype), list(t.shape)))
        bufs.append(tensor_buffer(t))
    return refs, bufs


def decode_tensor(ref: TensorRef, payload: Sequence[Buffer]) -> torch.Tensor:
    """A view on the payload frame; raises ValueError on a bad index, dtype or size."""
    if not 0 <= ref.frame < len(payload):
        raise ValueError(f"tensor frame {ref.frame} out of range ({len(payload)} payload frames)")
    dtype = dtype_from_name(ref.dtype)
    buf = payload[ref.frame]
    numel = 1
    for d in ref.shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {ref.shape}")
        numel *= d
    expected = numel * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(f"frame {ref.frame} has {len(buf)} bytes, shape {ref.shape} {ref.dtype} needs {expected}")
    if expected == 0:
        return torch.empty(ref.shape, dtype=dtype)
    with warnings.catch_warnings():  # frombuffer warns on read-only buffers; the view is not written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).view(ref.shape)


# -- trainer half -------------------------------------------------------------------------------
_PACK_LANE = ThreadPoolExecutor(1, thread_name_prefix="rw-inline-pack")  # one bucket at a time, in order


MAX_PULLS_PER_PEER = 64  # pull requests one connection may have waiting for credits (trainer side)

class BucketServer:
    """The buckets of one inline push, each packed on its first pull (or ahead of it) into a reused
    buffer, its checksum computed as it is packed (still in cache), so no pass over the version
    precedes the announcement; the checksum travels in the BucketData reply.

    Buckets are packed one at a time, in the order they are asked for, each on every copy thread
    (``memcopy.copy_pool``): the first bucket is ready as early as it can be and the wire starts
    sending it while the next is packed (one bucket per thread, as before, packed a lone 107 MB
    bucket on one core while the other idled)."""

    def __init__(self, plans: Sequence[BucketPlan], pack_buf: torch.Tensor) -> None:
        self.plans = plans
        self.pack_buf = pack_buf  # handed back to the publisher for the next push: warm memory
        self._offsets: list[int] = []
        self._packed: dict[int, asyncio.Future[tuple[memoryview, int]]] = {}

    async def bucket(self, index: int, packer: Executor, *, ahead: int) -> tuple[memoryview, int]:
        """The bytes of bucket ``index``, contiguous, without a copy once packed, and their checksum."""
        self.prefetch(packer, index, ahead + 1)  # pack ahead of the pulls
        return await self._packed[index]

    def prefetch(self, packer: Executor, first: int, n: int) -> None:
        for i in range(first, min(len(self.plans), first + n)):
            self._start_packing(i, packer)

    def _start_packing(self, index: int, packer: Executor) -> None:
        if index in self._packed:
            return
        plan = self.plans[index]
        if _is_one_tensor(plan):  # a bucket of one tensor is that tensor: no packing, only the checksum
            view = tensor_bytes(plan.sources[0])

            def hashed() -> tuple[memoryview, int]:
                h = Hasher(copy_pool())
                h.update(view)
                return view, h.result()

            self._packed[index] = asyncio.wrap_future(_PACK_LANE.submit(hashed))
            return
        if not self._offsets:
            self._offsets = packed_offsets(self.plans)
            need = self._offsets[-1] + self.plans[-1].nbytes
            if self.pack_buf.numel() < need:
                self.pack_buf = torch.empty(need, dtype=torch.uint8).fill_(0)  # touched once, warm after
        off, buf = self._offsets[index], self.pack_buf

        def pack() -> tuple[memoryview, int]:
            dst = buf[off:off + plan.nbytes]
            return byte_view(dst), pack_with_checksum([plan], [dst], copy_pool(), copy_threads())[0]

        self._packed[index] = asyncio.wrap_future(_PACK_LANE.submit(pack))


class InlineSender(Sender):
    """The trainer half: buckets are served to each receiver's pulls (on the trainer's ROUTER),
    packed on first pull into a reused buffer, ``window`` ahead, each with its checksum."""

    def __init__(self) -> None:
        self._waiting: Counter[bytes] = Counter()  # pulls waiting for credits, per connection

    async def serve_pull(self, push: Any, peer: bytes, rid: int, msg: PullBucket, link: TrainerLink,
                         workers: Executor, window: int) -> None:
        """Answer ``peer``'s pull of one bucket of ``push`` (the version announced now, or None)
        once it has a credit: the bucket's bytes, zero-copy, and its checksum. A connection may have
        at most MAX_PULLS_PER_PEER pulls waiting (more are refused ``overloaded``)."""
        if self._waiting[peer] >= MAX_PULLS_PER_PEER:
            link.counters["pulls_refused"] += 1
            await link.refuse(peer, rid, ErrorCode.OVERLOADED, f"more than {MAX_PULLS_PER_PEER} pulls outstanding "
                                                              "on this connection")
            return
        if push is None or push.version != msg.version or not 0 <= msg.index < len(push.plans):
            await link.refuse(peer, rid, ErrorCode.BAD_VERSION, f"bucket {msg.index} of version {msg.version} "
                                                               "is not being pushed")
            return
        self._waiting[peer] += 1
        try:
            async with push.credits(peer, window):
                buf, digest = await push.bucket_bytes(msg.index, workers, ahead=window)
                data = BucketData(version=msg.version, index=msg.index, checksum=digest)
                if await link.reply(peer, rid, data, [buf]):
                    push.bytes_sent += memoryview(buf).nbytes
        finally:
            self._waiting[peer] -= 1
            if self._waiting[peer] <= 0:
                del self._waiting[peer]

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        return [INBAND] * len(push.plans), InlinePayload()  # each checksum comes with its BucketData

    def announced(self, push: Any, workers: Executor, window: int) -> None:
        push.served.prefetch(workers, 0, window)  # pack the first buckets while the receivers ask for them


def _is_one_tensor(plan: BucketPlan) -> bool:
    return len(plan.sources) == 1 and plan.sources[0].is_contiguous()


# -- receiver half ------------------------------------------------------------------------------
async def pull_inline(trainer: RpcClient[Any], ready: WeightsReady, *, window: int, stall_timeout_s: float,
                      pool: Executor, counters: Any) -> Staged:
    """Pull every bucket with at most ``window`` requests outstanding. All pulls of a version share one
    request id, so replies are matched by (version, index): duplicates and replies to nothing we
    asked for are counted and dropped, any order is fine. No progress for ``stall_timeout_s``
    (no accepted bucket) fails the version with TIMEOUT. Anything else the trainer sends, or a link
    that dies under us, fails the version with a typed StagingError; nothing else is raised."""
    n = ready.n_buckets
    rid = trainer.next_rid()
    replies = trainer.open_stream(rid)
    got: dict[int, Buffer] = {}
    checks: list[asyncio.Future[Any]] = []
    asked: set[int] = set()
    try:
        await _pull(trainer, rid, replies, ready, window, stall_timeout_s, pool, counters, got, checks, asked)
    except ConnectionClosed as e:  # the bucket link's receiving task died (what the trainer sent broke it)
        raise StagingError(ErrorCode.BAD_FRAME, f"trainer link closed: {e}") from None
    finally:
        trainer.close_stream(rid)
        for c in checks:
            c.cancel()
    return as_frames(ready.buckets, [got[i] for i in range(n)])


async def _pull(trainer: RpcClient[Any], rid: int, replies: asyncio.Queue[Any], ready: WeightsReady, window: int,
                stall_timeout_s: float, pool: Executor, counters: Any, got: dict[int, Buffer],
                checks: list[asyncio.Future[Any]], asked: set[int]) -> None:
    """pull_inline's loop: fills ``got``, ``checks`` and ``asked`` (the caller cleans up)."""
    n = ready.n_buckets
    next_index = 0
    while next_index < n and len(asked) < window:
        await trainer.send(rid, PullBucket(version=ready.version, index=next_index))
        asked.add(next_index)
        next_index += 1
    progress = time.monotonic()
    while len(got) < n:
        left = progress + stall_timeout_s - time.monotonic()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                item = await replies.get()
        except TimeoutError:
            raise StagingError(ErrorCode.TIMEOUT, f"stalled: no bucket for {stall_timeout_s}s "
                                                  f"({len(got)}/{n} received)") from None
        if isinstance(item, ProtocolError):
            raise StagingError(item.code, f"trainer reply: {item.message}")
        if isinstance(item, ConnectionClosed):
            raise StagingError(ErrorCode.BAD_FRAME, f"trainer link: {item}")
        if isinstance(item, BaseException):
            raise StagingError(ErrorCode.BAD_FRAME, f"trainer link: {item!r}"[:300])
        msg = item.msg
        if isinstance(msg, ErrorReply):
            raise StagingError(msg.code, f"trainer: {msg.message}")
        if not isinstance(msg, BucketData) or msg.version != ready.version or msg.index not in asked:
            counters.inc("duplicate_buckets" if isinstance(msg, BucketData) and msg.index in got
                         else "unexpected_replies")
            continue
        if len(item.payload) != 1:
            raise StagingError(ErrorCode.BAD_FRAME, f"bucket {msg.index} came in {len(item.payload)} frames")
        asked.discard(msg.index)
        got[msg.index] = item.payload[0]
        progress = time.monotonic()
        if next_index < n:  # one credit back: keep the window full while we verify
            await trainer.send(rid, PullBucket(version=ready.version, index=next_index))
            asked.add(next_index)
            next_index += 1
        # verified on worker threads while the next buckets arrive
        checks.append(asyncio.ensure_future(check_bucket(ready.buckets[msg.index], got[msg.index], pool,
                                                   msg.checksum)))
    raise_problems(await asyncio.gather(*checks))


FRAME_OVERHEAD = 64 << 10  # what ZeroMQ counts against MAXMSGSIZE beyond the bytes (CURVE: box, nonce, command)


def bucket_frame_limit(ready: WeightsReady) -> int:
    """The inbound frame limit for a version's bucket link: its largest bucket, plus CURVE's
    per-frame overhead (libzmq checks the encrypted frame: a limit of exactly the bucket size
    drops the connection under CURVE), and never below the control limit (the body frame)."""
    return max([CONTROL_MAX_FRAME, *(b.nbytes + FRAME_OVERHEAD for b in ready.buckets)])


class InlineStager(Stager):
    """Pulls each version on a bucket link of its own: a DEALER to the trainer sized for that
    version's buckets; replies are received without a copy and handed on as views (they outlive
    the socket)."""

    def __init__(self, trainer_endpoint: str, *, curve: CurveClient | None, window: int, counters: Any) -> None:
        self.trainer_endpoint = trainer_endpoint
        self.curve = curve
        self.window = window
        self.counters = counters

    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        largest = max((b.nbytes for b in ready.buckets), default=0)
        if largest > BUCKET_MAX_FRAME:
            raise StagingError(ErrorCode.BAD_FIELD, f"a bucket of {largest} bytes is above this receiver's "
                                                    f"limit of {BUCKET_MAX_FRAME}")
        link: RpcClient[Any] = RpcClient(self.trainer_endpoint, TrainerReply, copy_threshold=0, curve=self.curve,
                                         zmtp_heartbeat=False, max_frame_bytes=bucket_frame_limit(ready))
        try:
            tensors, frames = await pull_inline(link, ready, window=self.window, stall_timeout_s=stall_timeout_s,
                                                pool=pool, counters=self.counters)
        finally:
            await link.close()
        return tensors, frames, {}
