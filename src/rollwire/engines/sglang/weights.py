"""Loading a weight version into SGLang: CUDA IPC / shared-memory tensors, or an NCCL broadcast.

Both paths need a paused engine, check every tensor's name, shape and dtype against the
checkpoint before anything is sent, and make the per-token version bookkeeping exact before the
new version goes live (``_prepare_switch``).

NCCL (``join_weight_group`` + ``update_weights_from_distributed``), as SGLang's own RL users do
it: the engine joins a process group with the trainer (trainer rank 0, the engine's TP ranks from
``rank_offset``); then for each version the engine posts one receive per tensor (in buckets of
``weight_bucket_bytes``, in the order given) while the trainer broadcasts the same tensors in
the same order from rank 0. The trainer must run with ``NCCL_CUMEM_ENABLE=0`` as SGLang's
processes do (mixed settings fail with "Cuda failure 'invalid argument'" in NCCL's p2p
transport). SGLang receives a bucket into fresh buffers and loads it only after every broadcast
of that bucket completed; a push that fails or times out raises ``EngineError("weights_failed")``
and tears the group down (best effort), so the next push starts with a fresh
``join_weight_group``. A bucket already loaded before a later one failed stays loaded, so the
engine holds requests until a whole version has loaded (the version number does not change on
failure). Bucketing and serialization: ``payloads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rollwire.engines.base import EngineError, MemoryTag
from rollwire.engines.sglang import compat
from rollwire.engines.sglang.args import Checkpoint
from rollwire.engines.sglang.payloads import (
    FlatStaging,
    serialize,
    serialize_flat,
    spec_buckets,
    stage_cpu,
    tensor_buckets,
)
from rollwire.engines.sglang.requests import Live
from rollwire.messages.control import ParamSpec
from rollwire.messages.errors import ErrorCode
from rollwire.runtime.logging import get_logger

log = logging.getLogger(__name__)
slog = get_logger("rollwire.engines.sglang")
EVICT_TIMEOUT_S = 60.0


class WeightsMixin:
    """SGLangEngine's weight-loading half (the attributes below are SGLangEngine's)."""

    _tm: Any
    _io: Any
    _serializer: Any
    _flat_staging: FlatStaging  # where views of the trainer's CUDA arena are copied for SGLang, reused
    _flat_meta: Any  # SGLang's FlattenedTensorMetadata (None: this SGLang has no flattened buckets)
    server_kwargs: dict[str, Any]
    _version: int
    _paused: bool
    _released: set[MemoryTag]
    _weights_sent: bool
    _lock: asyncio.Lock | None
    _live: dict[str, Live]
    _ckpt: Checkpoint
    _dtype: str
    _sched_paused: str
    _overlap: bool
    _session_keys: dict[str, str]
    _leaving: set[str]
    _groups: set[str]
    tp_size: int
    weight_bucket_bytes: int

    if TYPE_CHECKING:  # SGLangEngine's scheduler control
        async def _evict(self) -> None: ...
        async def _pause_scheduler(self, mode: str) -> None: ...
        async def _wait_states_finished(self, lives: list[Live], timeout: float) -> None: ...
        async def _settle(self, lives: list[Live], quiet_s: float = 0.003, limit_s: float = 0.2) -> None: ...

    # -- tensors from this process (CUDA IPC handles or shared memory) ---------------------------

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor, then load them in buckets of ``weight_bucket_bytes``."""
        self._check_loadable()
        items = list(named_tensors)
        self._check_tensors([(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in items])
        self._check_complete([n for n, _ in items])
        assert self._lock is not None
        async with self._lock:
            t0 = time.perf_counter()
            await self._prepare_switch()
            flush = self._flush_after_load()
            buckets = tensor_buckets(items, self.weight_bucket_bytes) if items else []
            staged_s = sglang_s = 0.0
            issued = False  # a load call reached SGLang: from then on a failure leaves a mix of versions
            try:
                for i, bucket in enumerate(buckets):
                    last = i == len(buckets) - 1
                    t = time.perf_counter()
                    flat = self._flat_meta is not None and self._flat_loadable(bucket)
                    payloads = (serialize_flat(self._serializer, bucket, self._flat_meta, self.tp_size,
                                               self._flat_staging) if flat
                                else serialize(self._serializer, stage_cpu(bucket), self.tp_size))
                    obj = self._io.UpdateWeightsFromTensorReqInput(
                        serialized_named_tensors=payloads, flush_cache=flush and last,
                        abort_all_requests=False, weight_version=str(version) if last else None,
                        load_format="flattened_bucket" if flat else None)
                    staged_s += time.perf_counter() - t
                    t = time.perf_counter()
                    issued = True
                    ok, message = await self._tm.update_weights_from_tensor(obj, None)
                    sglang_s += time.perf_counter() - t
                    if not ok:
                        raise EngineError(ErrorCode.WEIGHTS_FAILED,
                                          f"bucket {i + 1}/{len(buckets)}: {message}; the engine holds no "
                                          "complete version until every tensor is sent")
            except BaseException:
                # SGLang may hold part of this version now (earlier buckets, part of this one): no
                # version is whole, so requests stay held (``_runnable``) until a complete one loads
                if issued:
                    self._weights_sent = False
                raise
            self._go_live(version)
            slog.info("sglang_weights_loaded", version=version, buckets=len(buckets), staged_s=round(staged_s, 4),
                      sglang_s=round(sglang_s, 4), total_s=round(time.perf_counter() - t0, 4))

    def _flat_loadable(self, bucket: list[tuple[str, torch.Tensor]]) -> bool:
        """SGLang loads a flattened bucket from where it lies (no ``.to(device)`` as for a plain one):
        only for one TP rank whose GPU holds the whole bucket."""
        gpu = int(self.server_kwargs.get("base_gpu_id") or 0)
        return self.tp_size == 1 and all(t.is_cuda and t.device.index == gpu for _, t in bucket)

    # -- NCCL broadcast from a trainer ----------------------------------------------------------------

    async def join_weight_group(self, master_address: str, master_port: int, *, rank_offset: int = 1,
                                world_size: int = 2, group_name: str = "rollwire", backend: str = "nccl",
                                timeout_s: float = 120.0) -> None:
        """Join the trainer's weight process group (the trainer creates it as rank 0 at the same time,
        e.g. ``sglang.srt.utils.init_custom_process_group``). Raises EngineError on failure/timeout."""
        obj = self._io.InitWeightsUpdateGroupReqInput(
            master_address=master_address, master_port=int(master_port), rank_offset=int(rank_offset),
            world_size=int(world_size), group_name=group_name, backend=backend)
        try:
            ok, message = await asyncio.wait_for(self._tm.init_weights_update_group(obj, None), timeout_s)
        except TimeoutError:
            ok, message = False, f"no answer within {timeout_s}s"
        if not ok:
            raise EngineError(ErrorCode.WEIGHTS_FAILED, f"join weight group {group_name!r}: {message}")
        self._groups.add(group_name)

    async def leave_weight_group(self, group_name: str = "rollwire", timeout_s: float = 30.0) -> bool:
        """Destroy the group on the engine side (no-op if unknown); True if SGLang confirmed."""
        self._groups.discard(group_name)
        obj = self._io.DestroyWeightsUpdateGroupReqInput(group_name=group_name)
        try:
            ok, message = await asyncio.wait_for(self._tm.destroy_weights_update_group(obj, None), timeout_s)
        except (TimeoutError, Exception) as e:
            log.warning("leaving weight group %s failed: %s", group_name, e)
            return False
        if not ok:
            log.warning("leaving weight group %s: %s", group_name, message)
        return bool(ok)

    async def update_weights_from_distributed(self, specs: Sequence[tuple[str, str, Sequence[int]]], version: int,
                                              *, group_name: str = "rollwire", timeout_s: float = 120.0) -> None:
        """Receive ``specs`` (name, dtype, shape), in this order, from the trainer's rank-0 broadcast
        over ``group_name``; then ``version`` is live. Needs a paused engine and a joined group."""
        self._check_loadable()
        if group_name not in self._groups:
            raise EngineError(ErrorCode.WEIGHTS_FAILED, f"not in weight group {group_name!r}: join_weight_group first")
        items = [(n, tuple(int(x) for x in shape), str(dtype).removeprefix("torch.")) for n, dtype, shape in specs]
        self._check_tensors(items)
        self._check_complete([n for n, _, _ in items])
        assert self._lock is not None
        async with self._lock:
            await self._prepare_switch()
            flush = self._flush_after_load()
            buckets = spec_buckets(items, self.weight_bucket_bytes)
            # SGLang broadcasts a bucket into fresh tensors and loads them once all have arrived, so a
            # failed first bucket leaves the old version whole; after that, a mix (see update_weights)
            loaded = 0
            try:
                for i, bucket in enumerate(buckets):
                    last = i == len(buckets) - 1
                    obj = self._io.UpdateWeightsFromDistributedReqInput(
                        names=[n for n, _, _ in bucket], dtypes=[d for _, _, d in bucket],
                        shapes=[list(s) for _, s, _ in bucket], group_name=group_name,
                        flush_cache=flush and last, abort_all_requests=False,
                        weight_version=str(version) if last else None)
                    try:
                        ok, message = await asyncio.wait_for(self._tm.update_weights_from_distributed(obj, None),
                                                             timeout_s)
                    except TimeoutError:
                        ok, message = False, f"broadcast not complete within {timeout_s}s"
                    if not ok:
                        await self.leave_weight_group(group_name, timeout_s=10.0)
                        raise EngineError(ErrorCode.WEIGHTS_FAILED, f"nccl bucket {i + 1}/{len(buckets)} of version "
                                                            f"{version}: {message}; group {group_name!r} torn down")
                    loaded += 1
            except BaseException:
                if loaded:
                    self._weights_sent = False
                raise
            self._go_live(version)

    # -- shared steps ------------------------------------------------------------------------------

    def _check_loadable(self) -> None:
        if not self._paused:
            raise EngineError(ErrorCode.NOT_PAUSED, "update_weights needs a paused engine")
        if "weights" in self._released:
            raise EngineError(ErrorCode.WEIGHTS_FAILED, "weights are released: resume_memory(['weights']) first")

    def _flush_after_load(self) -> bool:
        """SGLang's flush after a load asserts an idle scheduler (a request we aborted counts until
        its abort came back: it may still be in the running batch); released KV was flushed already. Not
        needed for correctness (prefixes are keyed by version), and skipped while sessions may want
        their stale prefix."""
        self._leaving = {rid for rid in self._leaving if compat.is_live(self._tm, rid)}
        idle = not any(s.submitted for s in self._live.values()) and not self._leaving
        return idle and "kv_cache" not in self._released and not self._session_keys

    async def _prepare_switch(self) -> None:
        """Before a new version goes live: make every request's count of tokens produced so far
        exact, and keep old-version KV out of requests that must not reuse it.

        * After a ``retract`` pause every request inside SGLang is evicted and later re-submitted
          under the new version's cache key. Left in SGLang's waiting queue, a retracted request
          re-prefills by matching its own KV in the radix cache, computed by the old weights
          (seen on an H100: its continuation then differs from the new version's).
        * ``in_place`` keeps the KV by design. Segments not handed over token by token are evicted
          still: their tokens reach the adapter only at the end or every ``stream_interval``.
          SGLang's overlap scheduler keeps one step in flight, and an ``in_place`` pause leaves it
          there: its token (computed with the old weights) would come out after the switch.
          Re-pausing with ``retract`` makes the scheduler process that step first; the requests
          then re-prefill, reusing their cached KV. With ``disable_overlap_schedule`` an
          ``in_place`` pause is exact as it is.
        """
        inside = [s for s in self._live.values() if s.submitted and not s.done]
        if not inside:
            return
        if self._sched_paused != "in_place":
            await self._evict()
            return
        lagging = [s for s in inside if not s.per_token]  # SGLang holds tokens of these back
        if lagging or (self._sched_paused == "in_place" and self._overlap):
            await self._pause_scheduler("retract")
        for s in lagging:
            s.evicting = True
            self._tm.abort_request(s.srid)
        if lagging:
            await self._wait_states_finished(lagging, EVICT_TIMEOUT_S)
        await self._settle([s for s in inside if s.per_token])

    def _go_live(self, version: int) -> None:
        for s in self._live.values():
            s.marks.append((s.produced(), self._version))
        self._version = version
        self._weights_sent = True

    def _check_tensors(self, items: list[tuple[str, tuple[int, ...], str]]) -> None:
        """(name, shape, dtype) against the checkpoint's safetensors header."""
        known = self._ckpt.tensors
        if not known:
            return  # no safetensors header to check against (e.g. a .bin checkpoint)
        want_dtype = self._dtype if self._dtype not in ("auto", "") else None
        for name, shape, dtype in items:
            meta = known.get(name)
            if meta is None and name == "lm_head.weight" and self._ckpt.tied_embeddings:
                meta = known.get("model.embed_tokens.weight")
            if meta is None:
                raise EngineError(ErrorCode.UNKNOWN_TENSOR, f"no parameter named {name!r}")
            want_shape, ckpt_dtype = meta
            if tuple(shape) != want_shape:
                raise EngineError(ErrorCode.SHAPE_MISMATCH, f"{name}: got {tuple(shape)}, want {want_shape}")
            if dtype != (want_dtype or ckpt_dtype):
                raise EngineError(ErrorCode.DTYPE_MISMATCH, f"{name}: got {dtype}, want {want_dtype or ckpt_dtype}")

    def parameters(self) -> list[ParamSpec]:
        """The checkpoint's tensors (safetensors header), with the dtype loads must have; required
        as ``_check_complete`` requires them. Empty without a safetensors header."""
        want_dtype = self._dtype if self._dtype not in ("auto", "") else None
        tied = self._ckpt.tied_embeddings
        return [ParamSpec(name, want_dtype or dtype, list(shape),
                          not (tied and name == "lm_head.weight") and "rotary_emb." not in name)
                for name, (shape, dtype) in self._ckpt.tensors.items()]

    def _check_complete(self, names: list[str]) -> None:
        """After a weights release, or a load that failed part-way, SGLang's weights are garbage
        until every tensor is sent again: a version that leaves out one of the checkpoint's tensors
        is refused before anything of it is loaded (``incomplete_version``). Known limit: tensors a
        checkpoint carries that SGLang does not load (e.g. DeepSeek's MTP layers without nextn) are
        required too."""
        known = self._ckpt.tensors
        if self._weights_sent or not known:
            return
        sent = set(names)
        tied = self._ckpt.tied_embeddings  # SGLang skips lm_head.weight then: the embedding itself must come
        missing = [n for n in known if n not in sent and not (tied and n == "lm_head.weight")
                   and "rotary_emb." not in n]  # inv_freq / cos / sin caches some checkpoints carry; not loaded
        if missing:
            raise EngineError(ErrorCode.INCOMPLETE_VERSION, f"{len(missing)} of {len(known)} tensors not sent (e.g. "
                                                    f"{missing[0]!r}); after a weights release every tensor "
                                                    "must be sent again")

    async def _close_groups(self) -> None:
        for g in list(self._groups):
            with contextlib.suppress(Exception):
                await self.leave_weight_group(g, timeout_s=5.0)
