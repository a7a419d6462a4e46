"""Weights by torch.distributed broadcast: the path of SGLang's init_weights_update_group /
update_weights_from_distributed. The trainer is rank 0; receivers are ranks 1..N; every tensor
goes out by ``broadcast(src=0)`` in the announced order. Backend "gloo" on CPU (tested in CI),
"nccl" on GPUs (same code; the trainer sets NCCL_CUMEM_ENABLE=0, as SGLang does for its processes).

The group is built from a ``TCPStore`` and the backend's ProcessGroup constructor directly, never
``init_process_group``: a trainer's own default group (FSDP, DDP...) is left alone, and any number
of weight groups can come and go in one process.

Lifetime (the trainer's choice, see TrainerPublisher): a group is *persistent*. It is built on the
first push to a set of receivers and reused while that set and every push stay healthy; any
failure or timeout tears it down on both sides (a peer's broadcast then fails at once with
"connection closed" instead of waiting out its timeout), and the next push builds a new one on a
new port, so both sides can tell an old group from a new one by its init_method string.

Every call here blocks (rendezvous, collectives): run it on a worker thread, never on an event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def available(backend: str) -> bool:
    if not dist.is_available():
        return False
    if backend == "gloo":
        return dist.is_gloo_available()
    if backend == "nccl":
        return dist.is_nccl_available() and torch.cuda.is_available()
    return False


def _host_port(init_method: str) -> tuple[str, int]:
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"broadcast group init_method must be tcp://host:port, got {init_method!r}")
    return url.hostname, url.port


class BroadcastGroup:
    """One weight-broadcast group: ``host`` (rank 0, returns at once) or ``join`` (rank >= 1),
    then ``connect`` (blocks until every rank arrived), ``broadcast`` per tensor, ``close``."""

    def __init__(self, store: Any, init_method: str, rank: int, world_size: int, backend: str,
                 timeout_s: float) -> None:
        self.init_method = init_method
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = store
        self._pg: Any = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @classmethod
    def host(cls, host: str, world_size: int, *, backend: str = "gloo", timeout_s: float = 60.0) -> BroadcastGroup:
        """Rank 0: open the rendezvous store on a free port of ``host`` (non-blocking)."""
        cls._check(backend)
        if backend == "nccl":
            os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
        store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return cls(store, f"tcp://{host}:{store.port}", 0, world_size, backend, timeout_s)

    @classmethod
    def join(cls, init_method: str, rank: int, world_size: int, *, backend: str = "gloo",
             timeout_s: float = 60.0) -> BroadcastGroup:
        """Rank >= 1: connect to rank 0's store (blocks until it is reachable or timeout)."""
        cls._check(backend)
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank {rank} outside 1..{world_size - 1}")
        if backend == "nccl":  # agree with the trainer (and SGLang); a timed-out collective must fail the
            # push, not kill the server: NCCL's watchdog then only aborts the communicator (mode 2)
            os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        host, port = _host_port(init_method)
        store = dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, init_method, rank, world_size, backend, timeout_s)

    @staticmethod
    def _check(backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown broadcast backend {backend!r}; choose one of {BACKENDS}")
        if not available(backend):
            raise ValueError(f"backend {backend!r} is not available in this process (torch {torch.__version__})")

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def connect(self) -> None:
        """Build the process group; blocks until all ranks joined (or raises after the timeout)."""
        if self._pg is not None:
            return
        if self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(self._store, self.rank, self.world_size, opts)
        else:
            self._pg = dist.ProcessGroupGloo(self._store, self.rank, self.world_size, self.timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send (rank 0) or receive into (others) ``tensor``, which must be contiguous on ``device``."""
        if self._pg is None:
            raise RuntimeError("broadcast group is not connected")
        if tensor.numel() == 0:
            return  # nothing to move; every rank skips it alike (the layout is shared)
        # as raw bytes: gloo lacks some dtypes (bool...), and a broadcast only copies bytes anyway
        self._pg.broadcast(tensor.view(-1).view(torch.uint8), 0).wait()

    def close(self) -> None:
        """Tear the group down; peers blocked in a collective fail promptly."""
        pg, self._pg = self._pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.abort() if self.backend == "nccl" else pg.shutdown()
        self._store = None
