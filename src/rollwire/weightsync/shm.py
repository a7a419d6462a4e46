"""Shared-memory arenas for same-host weight pushes: the trainer writes once, receivers read in place.

A fresh segment costs page faults on first touch (0.3-0.7 GiB/s measured here, against ~11 GiB/s
into warm memory), so the trainer creates its arena ONCE and reuses it for every push; it is
recreated (new name, old one unlinked) only when a push needs more bytes than it has, or when a
straggling receiver may still be reading it (``retire``). Pages are allocated up front with
``posix_fallocate``: a /dev/shm that is too small (Docker's default is 64 MiB) fails at creation
with ENOSPC instead of killing a process with SIGBUS on a later write.

Segments live in /dev/shm (Linux). They are opened with ``os.open`` + ``mmap``, not
``multiprocessing.shared_memory``: on Python < 3.13 attaching registers the segment with the
attaching process's resource_tracker, which unlinks it when that process exits, taking the
trainer's arena with it. Here only the trainer unlinks: on ``close`` and at interpreter exit; a
trainer killed with SIGKILL leaves its arena behind, and the next trainer started in the same
pid namespace removes arenas whose creator is dead.

Receivers ``attach`` by name, read-only, and cache the mapping: a mapping stays valid after the
trainer unlinks the name, until the last tensor view on it dies.

Trainer half: ``layout_arena`` places a version in the reused arena behind its header
(``arena_header``), the version is announced, then ``pack`` writes it, each piece checksummed as it
is copied and flagged in the header once written. Receiver half: ``stage`` checks the buckets' place
and either waits for the whole version and verifies it in place, or (``verify_on_load``) hands the
engine checks that follow the trainer piece by piece, so the load overlaps the pack.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import mmap
import os
import re
import socket
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import INBAND, NamedTensor, Payload, ShmPayload, WeightsReady
from rollwire.weightsync.arena_header import HeaderReader, HeaderWriter, header_bytes, pieces_of
from rollwire.weightsync.layout import (
    BucketPlan,
    Sender,
    Stager,
    StagingError,
    Where,
    at_offsets,
    byte_view,
    pack_with_checksum,
    packed_offsets,
    uint8_view,
    verify_buckets,
)
from rollwire.weightsync.memcopy import ByteCheck, copy_pool, copy_threads

SHM_DIR = "/dev/shm"
_PREFIX = "rw-arena"
_NAME = re.compile(r"^rw-arena-[0-9a-f]+-[0-9]+-[0-9a-f]{12}$")  # names come off the wire: no paths
_GROW_QUANTUM = 2 << 20  # sizes are rounded up to 2 MiB: small growths do not recreate each push
_MAX_ATTACHED = 2  # arenas a process keeps mapped (the current one and the one it replaced)


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _pidns() -> str:
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "0"


def host_id() -> str:
    """Equal on two processes exactly when they can share /dev/shm: same kernel boot, same tmpfs
    mount (containers with private /dev/shm mounts get different ids)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        dev = os.stat(SHM_DIR).st_dev
    except OSError:
        dev = 0
    return f"{socket.gethostname()}/{boot}/{dev:x}"


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep_orphans() -> list[str]:
    """Unlink arenas left by trainers of this pid namespace that no longer run (SIGKILL)."""
    removed = []
    ns = _pidns()
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            if not _NAME.match(name) or name.split("-")[2] != ns:
                continue
            pid = int(name.split("-")[3])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except PermissionError:
                pass  # alive, someone else's
    return removed


class ShmArena:
    """Trainer side: one writable segment, reused across pushes."""

    def __init__(self) -> None:
        self.name = ""
        self.size = 0
        self.tensor = torch.empty(0, dtype=torch.uint8)  # flat uint8 view of the whole arena
        self._mm: mmap.mmap | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.created = 0  # how many segments this arena has made (benchmarks check it stays 1)
        self._stamps = itertools.count(1)  # one per push written here (arena_header: never 0)

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True if the segment was (re)created (the name changed)."""
        if self._mm is not None and nbytes <= self.size:
            return False
        self._create(max(_GROW_QUANTUM, -(-nbytes // _GROW_QUANTUM) * _GROW_QUANTUM))
        return True

    def next_stamp(self) -> int:
        return next(self._stamps)

    def retire(self) -> None:
        """The next ``reserve`` makes a new segment: a receiver may still be reading this one."""
        self.close()

    def _create(self, size: int) -> None:
        self.close()
        if self.created == 0:
            sweep_orphans()
        name = f"{_PREFIX}-{_pidns()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise OSError(e.errno, f"cannot allocate {size} bytes in {SHM_DIR} ({e.strerror}); "
                                           "enlarge it (docker: --shm-size) or use transport='inline'") from None
                os.ftruncate(fd, size)
            # MAP_POPULATE maps every page now, so the first push does not fault page by page
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink, path)
        self._mm, self.name, self.size = mm, name, size
        self.tensor = uint8_view(mm)
        self.created += 1

    def close(self) -> None:
        """Unlink the segment; mappings held elsewhere (receivers' views) stay valid until dropped."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        # drop our views; the mmap itself is released when no tensor exports it any more
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._mm, self.name, self.size = None, "", 0


@dataclass
class AttachedArena:
    name: str
    size: int
    tensor: torch.Tensor  # read-only flat uint8 view (writing to it would fault)


_attached: OrderedDict[str, AttachedArena] = OrderedDict()


def attach(name: str) -> AttachedArena:
    """Map arena ``name`` read-only, or return the cached mapping (one per process and name)."""
    arena = _attached.get(name)
    if arena is not None:
        _attached.move_to_end(name)
        return arena
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a rollwire shm arena name")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"shm arena {name!r} is empty")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    arena = AttachedArena(name, size, uint8_view(mm))
    _attached[name] = arena
    while len(_attached) > _MAX_ATTACHED:
        _attached.popitem(last=False)  # unmapped once the last view on it is gone
    return arena


def detach_all() -> None:
    _attached.clear()


def detach(name: str) -> None:
    _attached.pop(name, None)


def _current_size(name: str) -> int | None:
    """The arena file's size now (None: unlinked, and a mapping of an unlinked file cannot shrink
    by name). A trainer that truncates its arena after announcing it would make every read of the
    lost pages a SIGBUS in the receiver: checked at each staging (a truncation racing the copy itself
    is not caught; the trainer owns the file, mode 0600)."""
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_size
    except FileNotFoundError:
        return None


# -- trainer half -------------------------------------------------------------------------------
def layout_arena(arena: ShmArena, plans: Sequence[BucketPlan]) -> tuple[list[int], HeaderWriter]:
    """Make room in the reused arena for a version behind its header and start a new push in the
    header; returns each bucket's offset and the header to report the pack's progress in."""
    nbytes = [p.nbytes for p in plans]
    first = header_bytes(sum(pieces_of(nbytes)), len(plans))
    offsets = [first + off for off in packed_offsets(plans)]
    arena.reserve(offsets[-1] + plans[-1].nbytes if plans else first)
    return offsets, HeaderWriter(arena.tensor, arena.next_stamp(), nbytes)


def pack(arena: torch.Tensor, plans: Sequence[BucketPlan], offsets: Sequence[int], header: HeaderWriter) -> list[int]:
    """Write every bucket into ``arena`` at its offset, each piece checksummed as it is copied and
    flagged in ``header`` (on as many threads as torch uses, ``memcopy.copy_threads``); then every
    checksum, and the version is complete. Blocks: run it on a worker thread."""
    views = [arena[off:off + p.nbytes] for p, off in zip(plans, offsets, strict=True)]
    try:
        sums = pack_with_checksum(plans, views, copy_pool(), copy_threads(), header.piece_written)
    except BaseException:
        header.give_up()
        raise
    header.complete(sums)
    return sums


async def prepare(arena: ShmArena, plans: Sequence[BucketPlan], workers: Executor) -> tuple[list[int], list[int]]:
    """Lay out and pack a whole version before anything is announced (benchmarks time the parts of
    a push this way); returns each bucket's checksum and offset."""
    offsets, header = layout_arena(arena, plans)
    sums = await asyncio.get_running_loop().run_in_executor(workers, pack, arena.tensor, plans, offsets, header)
    return sums, offsets


class ShmSender(Sender):
    """The version is announced before it is packed (checksums INBAND: they come in the arena's
    header), and packed once announced, so receivers copy each piece as soon as it is written."""

    same_host = True

    def __init__(self) -> None:
        self.arena = ShmArena()
        self._header: HeaderWriter | None = None

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        push.offsets, self._header = layout_arena(self.arena, push.plans)
        return [INBAND] * len(push.plans), ShmPayload(name=self.arena.name, offsets=push.offsets,
                                                      stamp=self._header.stamp)

    def announced(self, push: Any, workers: Executor, window: int) -> None:
        assert self._header is not None
        push.writing = asyncio.get_running_loop().run_in_executor(workers, pack, self.arena.tensor, push.plans,
                                                                   push.offsets, self._header)

    def failed(self) -> None:
        if self._header is not None:
            self._header.give_up()  # receivers still waiting for pieces fail now
        self.arena.retire()  # a receiver may still read it: the next push writes a fresh one

    def unwaited(self) -> None:
        self.arena.retire()  # the last version is whole: nothing to give up, but it must not be overwritten

    def close(self) -> None:
        self.arena.close()


# -- receiver half ------------------------------------------------------------------------------
class ShmStager(Stager):
    """``verify_on_load``: the engine copies the arena's bytes into its parameters itself (the hf
    engine on a CPU), each piece as soon as the trainer has written it, and verifies it as it copies
    it (``memcopy.copy_verified``): staging neither waits for the pack nor reads the arena once more
    just to hash it. Otherwise staging waits until the trainer has written the whole version and
    verifies every bucket, before the engine is paused."""

    def __init__(self, verify_on_load: bool = False) -> None:
        self.verify_on_load = verify_on_load
        self._last: tuple[WeightsReady, list[torch.Tensor], HeaderReader] | None = None

    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        """Check the buckets' place in the trainer's arena and its header, and verify the buckets in
        place once written (unless the engine verifies them as it loads); tensors are byte offsets
        into the arena."""
        payload = ready.payload
        assert isinstance(payload, ShmPayload)
        self._last = None
        views, header = self._attach(ready, stall_timeout_s)
        if self.verify_on_load:
            self._last = (ready, views, header)
        else:  # the pack's end, then as many threads as the engine copies with
            try:
                sums = await asyncio.get_running_loop().run_in_executor(pool, header.checksums)
            except asyncio.CancelledError:
                header.cancel()  # the thread would poll on for the stall timeout
                raise
            metas = [msgspec.structs.replace(m, checksum=c) for m, c in zip(ready.buckets, sums, strict=True)]
            await verify_buckets(metas, [byte_view(v) for v in views], copy_pool())
        return at_offsets(ready.buckets, payload.offsets), [], {"shm_name": payload.name}

    def deferred_checks(self, ready: WeightsReady) -> list[ByteCheck]:
        if self._last is None or self._last[0] is not ready:
            return []
        _, views, header = self._last
        self._last = None
        return [ByteCheck(m.index, v, INBAND, header) for m, v in zip(ready.buckets, views, strict=True)]

    @staticmethod
    def _attach(ready: WeightsReady, stall_timeout_s: float) -> tuple[list[torch.Tensor], HeaderReader]:
        """Each bucket's bytes in the attached arena (flat uint8 views), bounds checked, and the
        arena's header for this push."""
        payload = ready.payload
        assert isinstance(payload, ShmPayload)
        if any(m.checksum != INBAND for m in ready.buckets):
            raise StagingError(ErrorCode.BAD_FIELD, "shm checksums come in the arena's header (announce -1)")
        if payload.stamp <= 0:
            raise StagingError(ErrorCode.BAD_FIELD, f"shm stamp {payload.stamp} is not positive")
        try:
            arena = attach(payload.name)
            current = _current_size(payload.name)
        except (OSError, ValueError) as e:
            raise StagingError(ErrorCode.BAD_FIELD, f"cannot attach shm arena {payload.name!r}: {e}") from None
        if current is not None and current < arena.size:  # reading the lost pages would be SIGBUS
            detach(payload.name)
            raise StagingError(ErrorCode.BAD_FIELD, f"shm arena {payload.name!r} shrank from {arena.size} to "
                                                    f"{current} bytes after it was mapped")
        nbytes = [m.nbytes for m in ready.buckets]
        first = header_bytes(sum(pieces_of(nbytes)), len(nbytes))
        views = []
        for meta, off in zip(ready.buckets, payload.offsets, strict=True):
            if off < first or off + meta.nbytes > arena.size:
                raise StagingError(ErrorCode.BAD_FIELD, f"bucket {meta.index} at {off}+{meta.nbytes} outside the "
                                                        f"{arena.size}-byte arena after its {first}-byte header")
            views.append(arena.tensor[off:off + meta.nbytes])
        return views, HeaderReader(arena.tensor, payload.stamp, nbytes, stall_timeout_s)
