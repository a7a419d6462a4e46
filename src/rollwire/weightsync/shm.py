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

Trainer half: ``prepare`` packs a version into the reused arena, each piece checksummed as it is
copied. Receiver half: ``stage`` verifies the buckets in place and names the tensors by offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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

import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import INBAND, NamedTensor, Payload, ShmPayload, WeightsReady
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
    raise_problems,
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

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True if the segment was (re)created (the name changed)."""
        if self._mm is not None and nbytes <= self.size:
            return False
        self._create(max(_GROW_QUANTUM, -(-nbytes // _GROW_QUANTUM) * _GROW_QUANTUM))
        return True

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
async def prepare(arena: ShmArena, plans: Sequence[BucketPlan], workers: Executor) -> tuple[list[int], list[int]]:
    """Pack every bucket into the reused arena, each piece checksummed right after it is copied (on
    a thread of ``workers`` and the process's copy helpers: as many threads as torch uses, see
    ``memcopy.copy_threads``). Returns each bucket's checksum and its offset in the arena."""
    offsets = packed_offsets(plans)
    arena.reserve(offsets[-1] + plans[-1].nbytes if plans else 1)
    views = [arena.tensor[off:off + p.nbytes] for p, off in zip(plans, offsets, strict=True)]
    sums = await asyncio.get_running_loop().run_in_executor(workers, pack_with_checksum, plans, views, copy_pool(),
                                                            copy_threads())
    return sums, offsets


class ShmSender(Sender):
    same_host = True

    def __init__(self) -> None:
        self.arena = ShmArena()

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        sums, offsets = await prepare(self.arena, push.plans, workers)
        push.arena, push.offsets = self.arena.tensor, offsets  # a pull (not needed) is served from here
        return sums, ShmPayload(name=self.arena.name, offsets=offsets)

    def failed(self) -> None:
        self.arena.retire()  # a receiver may still read it: the next push writes a fresh one

    def close(self) -> None:
        self.arena.close()


# -- receiver half ------------------------------------------------------------------------------
class ShmStager(Stager):
    """``verify_on_load``: the engine copies the arena's bytes into its parameters itself (the hf
    engine on a CPU) and verifies each piece as it copies it (``memcopy.copy_verified``), so staging
    does not read the arena once more just to hash it. Otherwise every bucket is verified here,
    before the engine is paused."""

    def __init__(self, verify_on_load: bool = False) -> None:
        self.verify_on_load = verify_on_load

    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        """Check the buckets' place in the trainer's arena and verify them in place (unless the
        engine verifies them as it loads); tensors are byte offsets into it."""
        payload = ready.payload
        assert isinstance(payload, ShmPayload)
        views = self._buckets(ready)
        if self.verify_on_load:
            raise_problems([f"bucket {m.index}: no checksum announced" if m.checksum == INBAND else None
                            for m in ready.buckets])
        else:  # as many threads as the engine copies with
            await verify_buckets(ready.buckets, [byte_view(v) for v in views], copy_pool())
        return at_offsets(ready.buckets, payload.offsets), [], {"shm_name": payload.name}

    def deferred_checks(self, ready: WeightsReady) -> list[ByteCheck]:
        if not self.verify_on_load:
            return []
        return [ByteCheck(m.index, v, m.checksum) for m, v in zip(ready.buckets, self._buckets(ready), strict=True)]

    @staticmethod
    def _buckets(ready: WeightsReady) -> list[torch.Tensor]:
        """Each bucket's bytes in the attached arena (flat uint8 views), bounds checked."""
        payload = ready.payload
        assert isinstance(payload, ShmPayload)
        try:
            arena = attach(payload.name)
            current = _current_size(payload.name)
        except (OSError, ValueError) as e:
            raise StagingError(ErrorCode.BAD_FIELD, f"cannot attach shm arena {payload.name!r}: {e}") from None
        if current is not None and current < arena.size:  # reading the lost pages would be SIGBUS
            detach(payload.name)
            raise StagingError(ErrorCode.BAD_FIELD, f"shm arena {payload.name!r} shrank from {arena.size} to "
                                                    f"{current} bytes after it was mapped")
        views = []
        for meta, off in zip(ready.buckets, payload.offsets, strict=True):
            if off < 0 or off + meta.nbytes > arena.size:
                raise StagingError(ErrorCode.BAD_FIELD, f"bucket {meta.index} at {off}+{meta.nbytes} outside the "
                                                        f"{arena.size}-byte arena")
            views.append(arena.tensor[off:off + meta.nbytes])
        return views
