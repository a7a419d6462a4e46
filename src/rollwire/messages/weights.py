"""Weight sync and memory control: trainer <-> WeightReceiverActor, and between actors.

Trainer side (TrainerPublisher binds a ROUTER at the trainer endpoint and a PUB beside it):
receivers register over DEALER, subscribe to the PUB for announcements, pull buckets under a
credit window, and report the outcome of every version. Inside the server, a verified version
is staged by the WeightReceiverActor into tensors (``weightsync/staged.py``), announced to the
MemoryGovernor as ``LoadVersion`` and loaded by the GenerationActor on one ``SwapWeights``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from rollwire.messages.envelope import TensorRef
from rollwire.messages.errors import ErrorReply

Transport = Literal["inline", "shm", "cuda_ipc", "nccl", "gloo"]
# barrier_release: every server holding a version loaded under a barrier (WeightsReady.barrier) resumes
StepPhase = Literal["train_start", "train_end", "rollout_start", "rollout_end", "barrier_release"]


# -- trainer <-> receiver ---------------------------------------------------------------
class Register(msgspec.Struct, frozen=True, kw_only=True, tag="register", array_like=True):
    """Receiver -> trainer: join; the reply is ``Welcome``."""

    receiver_id: str  # stable name of the receiving server
    host_id: str  # machine identity: shm and cuda_ipc need the same host
    transports: list[str]  # payload transports this receiver can use, fastest first
    live_version: int  # weight version serving now
    cuda_devices: list[str] = []  # cuda_ipc: UUIDs of the GPUs this receiver's process can open handles on
    checksums: list[str] = []  # bucket checksums it verifies (transports/checksum.py NAME); none: a crc32 rollwire


class Welcome(msgspec.Struct, frozen=True, kw_only=True, tag="welcome", array_like=True):
    trainer_id: str  # changes when the trainer restarts: receivers then register again
    pub_endpoint: str  # where announcements are published
    checksum: str = ""  # the bucket checksum its announcements carry; "": a crc32 rollwire (refused)


class StepMessage(msgspec.Struct, frozen=True, kw_only=True, tag="step", array_like=True):
    """Trainer -> all (PUB): where training is; drives the governor in colocated mode."""

    step: int
    phase: StepPhase


class TensorMeta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    name: str
    dtype: str
    shape: list[int]
    offset: int  # byte offset inside its bucket


class BucketMeta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    index: int
    nbytes: int
    # of the bucket's bytes (transports/checksum.py: xxh3-64 over 1 MiB pieces, 63 bits);
    # cuda_ipc: its 64-bit GPU checksum (cuda_ipc.py); INBAND (inline, broadcast): the checksum
    # comes with the bytes (BucketData, or one last broadcast)
    checksum: int
    tensors: list[TensorMeta]


class CudaIpcHandle(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """cuda_ipc: the trainer's arena, one flat CUDA buffer shared once (what torch's reduce_tensor
    exports for it; the receiver rebuilds it with rebuild_cuda_tensor). Only meaningful on the
    same host, between processes that can see the GPU ``device_uuid``."""

    device_uuid: str  # the GPU holding the arena (device indices differ between processes)
    handle: str  # cudaIpcMemHandle of the CUDA allocation holding the arena, hex
    storage_size: int  # bytes of the shared storage
    storage_offset: int  # byte offset of the storage inside that allocation
    ref_counter_handle: str  # torch's producer-side reference count (a shared-memory file name), hex
    ref_counter_offset: int
    event_handle: str  # cudaIpcEventHandle the receiver waits on when it first opens the handle, hex
    event_sync_required: bool
    nbytes: int  # bytes of the arena (the buckets lie in [0, nbytes))


class InlinePayload(msgspec.Struct, frozen=True, kw_only=True, tag="inline", array_like=True):
    """The receiver pulls each bucket from the trainer's ROUTER (PullBucket -> BucketData)."""


class ShmPayload(msgspec.Struct, frozen=True, kw_only=True, tag="shm", array_like=True):
    """Every bucket lies in the trainer's shared-memory arena (same host)."""

    name: str  # the arena, in /dev/shm (rw-arena-<pidns>-<pid>-<hex12>)
    offsets: list[int]  # byte offset of each bucket in the arena, after its header
    stamp: int  # this push in the arena's header (weightsync/arena_header.py): progress and checksums


class CudaIpcPayload(msgspec.Struct, frozen=True, kw_only=True, tag="cuda_ipc", array_like=True):
    """Every bucket lies in the trainer's CUDA arena (same host, a GPU the receiver can open)."""

    handle: CudaIpcHandle  # the arena
    offsets: list[int]  # byte offset of each bucket in the arena (multiples of 4096)


class GlooPayload(msgspec.Struct, frozen=True, kw_only=True, tag="gloo", array_like=True):
    """One torch.distributed broadcast per tensor, in announced order, from rank 0 (the trainer)."""

    group: str  # init_method of the broadcast group (tcp://host:port)
    ranks: list[str]  # receiver ids in rank order (rank i+1; the trainer is rank 0)


class NcclPayload(msgspec.Struct, frozen=True, kw_only=True, tag="nccl", array_like=True):
    """One NCCL broadcast per packed bucket of the trainer's CUDA arena, from rank 0 (the trainer)."""

    group: str  # init_method of the broadcast group (tcp://host:port)
    ranks: list[str]  # receiver ids in rank order (rank i+1; the trainer is rank 0)
    offsets: list[int]  # byte offset of each bucket in the arena, kept in the receiver's staging buffer


# How the bytes of an announced version travel: one struct per payload transport, its tag the
# transport's name.
Payload = InlinePayload | ShmPayload | CudaIpcPayload | GlooPayload | NcclPayload
PAYLOAD_TYPES: dict[str, type] = {str(p.__struct_config__.tag): p for p in Payload.__args__}  # type: ignore[attr-defined]


class WeightsReady(msgspec.Struct, frozen=True, kw_only=True, tag="weights_ready", array_like=True):
    """Trainer -> all (PUB): version ``version`` can be pulled."""

    trainer_id: str
    version: int  # strictly increasing
    step: int
    n_buckets: int
    total_bytes: int
    buckets: list[BucketMeta]
    payload: Payload  # the transport chosen for this push, and where its bytes are
    # barrier mode: a server loads the version and stays paused until StepMessage(barrier_release)
    # (or its own barrier timeout), so no server generates with it before every server has it
    barrier: bool = False

    @property
    def transport(self) -> str:
        """The payload transport's name (its tag), for logs and reports."""
        return str(self.payload.__struct_config__.tag)


class Beacon(msgspec.Struct, frozen=True, kw_only=True, tag="beacon", array_like=True, gc=False):
    """Trainer -> all (PUB), periodically: proves a subscriber receives (slow-joiner handshake)
    and carries the trainer's identity, so receivers notice a restarted trainer."""

    trainer_id: str
    seq: int


class BeaconSeen(msgspec.Struct, frozen=True, kw_only=True, tag="beacon_seen", array_like=True, gc=False):
    """Receiver -> trainer, for every beacon it receives: its SUB has joined (the trainer may now
    count it for pushes), and a heartbeat. No reply."""

    receiver_id: str
    trainer_id: str
    seq: int


class Leaving(msgspec.Struct, frozen=True, kw_only=True, tag="leaving", array_like=True):
    """Receiver -> trainer, as its server stops (SIGTERM, shutdown): count it out now, rather than
    after ``lost_after_s`` of silence; a push waiting on it fails for it at once. No reply."""

    receiver_id: str


class StepDone(msgspec.Struct, frozen=True, kw_only=True, tag="step_done", array_like=True):
    """Receiver -> trainer: the server acted on StepMessage ``step``/``phase`` (e.g. released
    memory on train_start), or failed to. No reply."""

    receiver_id: str
    step: int
    phase: str
    ok: bool
    error_code: str = ""
    message: str = ""


class PullBucket(msgspec.Struct, frozen=True, kw_only=True, tag="pull", array_like=True):
    """Receiver -> trainer: send bucket ``index`` of ``version`` (inline transport)."""

    version: int
    index: int


INBAND = -1  # BucketMeta.checksum of an inline bucket whose checksum comes with its BucketData


class BucketData(msgspec.Struct, frozen=True, kw_only=True, tag="bucket", array_like=True):
    """Trainer -> receiver: the bucket's bytes are payload frame 0."""

    version: int
    index: int
    checksum: int = INBAND  # of the bytes, computed as the trainer packed them (INBAND: none, use the announced)


class VersionOutcome(msgspec.Struct, frozen=True, kw_only=True, tag="outcome", array_like=True):
    """Receiver -> trainer: the version was applied (ok) or rejected, and why."""

    receiver_id: str
    version: int
    ok: bool
    error_code: str = ""
    message: str = ""
    seconds: float = 0.0  # announcement to applied, as the receiver saw it
    trainer_id: str = ""  # whose announcement this answers (a restarted trainer may reuse version numbers)


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="ack", array_like=True):
    pass


# The trainer's ROUTER (receivers' DEALERs send these) and what it answers.
TrainerRequest = Register | BeaconSeen | PullBucket | VersionOutcome | StepDone | Leaving
TrainerReply = Welcome | BucketData | Ack | ErrorReply
# The trainer's PUB.
TrainerAnnouncement = Beacon | WeightsReady | StepMessage


# -- inside the server ---------------------------------------------------------------------
class NamedTensor(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A staged tensor before it is resolved: a payload frame, or a byte offset into an arena."""

    name: str
    ref: TensorRef


PausePolicy = Literal["abort", "retract", "drain", "in_place"]  # what happens to requests in flight
MemoryTag = Literal["weights", "kv_cache", "cuda_graph"]  # what a release frees (SGLang's tags)
ALL_MEMORY_TAGS: tuple[MemoryTag, ...] = ("weights", "kv_cache", "cuda_graph")


class LoadVersion(msgspec.Struct, frozen=True, kw_only=True, tag="load_version", array_like=True):
    """WeightReceiverActor -> MemoryGovernor: a complete, verified version, staged in this
    process under ``staged`` (``weightsync.staged``); the reply is ``VersionApplied``."""

    version: int
    step: int
    staged: str
    hold: bool = False  # barrier mode: load, then stay paused until released


class SwapWeights(msgspec.Struct, frozen=True, kw_only=True, tag="swap_weights", array_like=True):
    """MemoryGovernor -> GenerationActor: the one load message. Pause under ``policy`` (unless
    ``released``: already paused for training), wake the released weights, load the staged version,
    wake the rest of ``released``, resume; the reply is ``VersionApplied``. On a failed load the
    old version serves again, or, when it had been released, the woken weights are released again."""

    version: int
    staged: str
    policy: PausePolicy
    drain_deadline_s: float = 30.0
    released: list[MemoryTag] = []
    hold: bool = False  # barrier mode: stay paused after the load (ResumeGeneration ends it)


class ResumeGeneration(msgspec.Struct, frozen=True, kw_only=True, tag="resume_generation", array_like=True):
    """MemoryGovernor -> GenerationActor: the barrier is released; resume. The reply is ``Ack``."""


class ReleaseForTraining(msgspec.Struct, frozen=True, kw_only=True, tag="release_for_training", array_like=True):
    """MemoryGovernor -> GenerationActor (colocated, on train_start): pause under ``policy``, then
    free ``tags``; the reply is ``Ack``. The next ``SwapWeights`` wakes them."""

    tags: list[MemoryTag]
    policy: PausePolicy
    drain_deadline_s: float = 30.0


class GovernorQuery(msgspec.Struct, frozen=True, kw_only=True, tag="governor_query", array_like=True):
    """GenerationActor -> MemoryGovernor: its state, for health and status."""


class GovernorStatus(msgspec.Struct, frozen=True, kw_only=True, tag="governor_status", array_like=True):
    state: str  # a GovernorState value


class VersionApplied(msgspec.Struct, frozen=True, kw_only=True, tag="version_applied", array_like=True):
    version: int
    load_s: float  # time spent loading into the engine
    pause_s: float  # time generation was paused around the load
