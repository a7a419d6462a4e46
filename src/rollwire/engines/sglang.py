"""The SGLang engine: the Engine protocol on ``sglang.Engine`` in token-in/token-out mode.

Importing this module needs SGLang (``pip install 'rollwire[sglang]'``); nothing else in rollwire
imports it. The ``sglang.Engine`` is built in ``start()``, on the event loop that will drive it
(SGLang keeps the running loop as ``eng.loop`` and runs the TokenizerManager's tasks there).
Everything after that is a coroutine on that loop talking to the TokenizerManager directly:
``Engine``'s own synchronous methods call ``loop.run_until_complete`` and cannot be used from
inside the running loop.

How the protocol maps onto SGLang 0.5.x, and the traps each mapping avoids:

* generate: ``TokenizerManager.generate_request`` with ``input_ids`` and ``stream=True``. New
  tokens and logprobs are read from the request's ``ReqState`` (filled as outputs arrive), so
  nothing is lost when several outputs queue up between two reads. Each engine request gets a
  fixed-width SGLang rid: SGLang aborts by rid *prefix*, and fixed width makes rids prefix-free.
* allowed/disallowed token masks: a custom logit processor (``_TokenMask``), so the engine is
  always started with ``enable_custom_logit_processor=True``. Logprobs are SGLang's:
  log_softmax(masked logits / T) before top-k/top-p/min-p, as the hf engine reports them.
* seed: SGLang honours ``sampling_seed`` only with ``enable_deterministic_inference``; without
  it a request with a seed is refused (bad_sampling_params) rather than silently unseeded.
* pause(abort|retract|in_place): ``pause_generation`` is fire-and-forget to the scheduler, so each
  pause is followed by a round trip to the scheduler; when it returns no step is running and the
  outputs of earlier steps have been handled. ``abort`` is done as retract + abort of every
  request (SGLang's own abort mode polls once a second).
* update_weights: ``update_weights_from_tensor`` in buckets of ~512 MiB (tiny buckets have
  garbled outputs on large models), ``abort_all_requests=False`` (the default of
  ``update_weight_version`` would undo a retract/in_place pause), the version passed along as
  ``weight_version``. SGLang's flush after a load asserts that the scheduler is idle, so the
  cache is flushed only when no request is inside SGLang; requests carry
  ``extra_key=<weight version>`` so a prefix computed under old weights is never reused by a
  request started under new ones.
* release_memory: SGLang asserts an idle scheduler and loses the weights (resume, then re-send
  them). Requests still inside SGLang are *evicted* first: aborted there, kept here, and
  re-submitted (prompt + output so far, the remaining token budget) once the engine runs again,
  which is what a retract does. flush_cache evicts the same way when paused.
* stop_token_ids with ignore_eos: SGLang's ignore_eos also switches its stop ids off, so then the
  adapter watches for them itself, ends the request with "stop" and aborts it inside SGLang.
* weight version per token: when a version goes live, the number of tokens each live request
  has produced is recorded; tokens before that mark belong to the old version. Known limit (seen
  on an H100): with SGLang's overlap scheduler an ``in_place`` pause leaves the step already
  launched in flight, and its one token per running request comes out after resume, computed
  with the old weights but tagged with the new version. ``retract`` and ``abort`` are exact; so is
  ``in_place`` with ``--engine-arg disable_overlap_schedule=true``.
* cost: every request is streamed (the version marks need the token counts), and SGLang's own
  streaming path is the larger part of the gap to non-streamed ``async_generate`` (see
  bench/results/sglang_throughput.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import random
import re
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if importlib.util.find_spec("sglang") is None:  # the server turns this into "pip install 'rollwire[sglang]'"
    raise ImportError("rollwire.engines.sglang needs SGLang: pip install 'rollwire[sglang]'")

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from rollwire.engines.base import (
    ALL_MEMORY_TAGS,
    EngineDelta,
    EngineError,
    EngineInfo,
    EngineRequest,
    MemoryTag,
    PauseMode,
)
from rollwire.engines.hf_sampling import check_params
from rollwire.messages.generate import FinishReason

log = logging.getLogger(__name__)

WEIGHT_BUCKET_BYTES = 512 << 20  # as slime and verl: hundreds of MB per update_weights_from_tensor call
# Always set on the sglang.Engine: token ids in and out; masks need the custom logit processor.
FORCED_ARGS: dict[str, Any] = {"skip_tokenizer_init": True, "enable_custom_logit_processor": True}
# Defaults the caller may override with engine_args.
DEFAULT_ARGS: dict[str, Any] = {"enable_memory_saver": True, "log_level": "warning"}
_EVICT_TIMEOUT_S = 60.0


# -- engine arguments --------------------------------------------------------------------------------


def _field_types() -> dict[str, str]:
    """ServerArgs field name -> its annotation as text (the module uses postponed annotations)."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    return {f.name: str(f.type) for f in dataclasses.fields(ServerArgs)}


def _base_type(annotation: str) -> str:
    """'A[Optional[int], "help"]' -> 'int'; 'A[List[str], ...]' -> 'list'; unknown -> 'str'."""
    t = annotation.replace(" ", "")
    m = re.match(r"(?:A|Annotated)\[(.*)", t)
    if m:
        t = m.group(1)
    t = re.sub(r"^Optional\[", "", t)
    for name, base in (("bool", "bool"), ("int", "int"), ("float", "float"), ("List", "json"), ("list", "json"),
                       ("Dict", "json"), ("dict", "json"), ("Tuple", "json"), ("tuple", "json")):
        if t.startswith(name):
            return base
    return "str"


def convert_engine_args(args: Mapping[str, object]) -> dict[str, Any]:
    """``--engine-arg key=value`` strings -> typed ``sglang.Engine`` keyword arguments.

    Keys may use dashes or underscores. Each value is converted by the type of the ServerArgs
    field (bool: true/false/1/0/yes/no; int; float; lists and dicts as JSON); "none"/"null" gives
    None. Non-string values pass through. An unknown key raises ValueError.
    """
    types = _field_types()
    out: dict[str, Any] = {}
    for raw_key, value in args.items():
        key = raw_key.replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown sglang engine argument {raw_key!r} (see sglang's ServerArgs)")
        out[key] = _convert(key, value, _base_type(types[key])) if isinstance(value, str) else value
    return out


def _convert(key: str, value: str, base: str) -> Any:
    v = value.strip()
    if v.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(v)
        if base == "int":
            return int(v)
        if base == "float":
            return float(v)
        if base == "json":
            return json.loads(v)
    except ValueError:
        raise ValueError(f"engine argument {key}={value!r}: expected {base}") from None
    return value


# -- checkpoint facts (read without loading weights) -------------------------------------------------


@dataclass
class _Checkpoint:
    vocab_size: int
    eos_token_ids: list[int]
    max_position_embeddings: int
    dtype: str
    tied_embeddings: bool
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype), empty if unknown
    nbytes: int  # bytes of all tensors in the checkpoint


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_checkpoint(path: str) -> _Checkpoint:
    root = Path(path)
    cfg: dict[str, Any] = json.loads((root / "config.json").read_text())
    text: dict[str, Any] = cfg.get("text_config") or cfg
    eos: Any = text.get("eos_token_id", cfg.get("eos_token_id"))
    gen = root / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = [] if eos is None else [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    nbytes = 0
    for f in sorted(root.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = (tuple(meta["shape"]), _ST_DTYPES.get(meta["dtype"], meta["dtype"]))
            start, end = meta["data_offsets"]
            nbytes += end - start
    return _Checkpoint(
        vocab_size=int(text["vocab_size"]), eos_token_ids=eos_ids,
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        dtype=str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "auto"),
        tied_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        tensors=tensors, nbytes=nbytes,
    )


# -- token masks -------------------------------------------------------------------------------------


class _TokenMask(CustomLogitProcessor):
    """Runs in SGLang's scheduler on the logits of the rows that carry rollwire masks.

    ``custom_params`` of a row: ``{"rw_allowed": [ids]}`` and/or ``{"rw_disallowed": [ids]}``. The
    per-row mask is built once and cached in that row's params dict (SGLang keeps the dict of a
    request for its whole life). The class travels by reference (dill), so the scheduler imports
    this module.
    """

    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for i, p in enumerate(custom_param_list or ()):
            if not p:
                continue
            keep = p.get("_rw_keep")
            if keep is None or keep.device != logits.device or keep.shape[0] != logits.shape[-1]:
                keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                if p.get("rw_allowed") is not None:
                    keep[:] = False
                    keep[torch.tensor(p["rw_allowed"], dtype=torch.long, device=logits.device)] = True
                if p.get("rw_disallowed"):
                    keep[torch.tensor(p["rw_disallowed"], dtype=torch.long, device=logits.device)] = False
                p["_rw_keep"] = keep
            logits[i].masked_fill_(~keep, float("-inf"))
        return logits


# -- per-request state --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    req: EngineRequest
    output: list[int] = field(default_factory=list)  # every token delivered so far (all segments)
    logprobs: list[float] = field(default_factory=list)
    marks: list[tuple[int, int]] = field(default_factory=list)  # (tokens produced, version before) per switch
    srid: str = ""  # SGLang rid of the current segment ("" when not inside SGLang)
    state: Any = None  # SGLang's ReqState of the current segment
    seg_base: int = 0  # len(output) when the current segment was submitted
    abort_requested: bool = False
    evicting: bool = False  # aborted inside SGLang to be re-submitted later, not finished
    killed: bool = False  # shutdown stopped waiting for SGLang's answer
    done: bool = False
    pending: asyncio.Future[Any] | None = None  # the segment's next output

    @property
    def submitted(self) -> bool:
        return bool(self.srid)

    def produced(self) -> int:
        """Tokens this request has produced, including outputs SGLang handled that were not yet read."""
        if self.state is not None:
            return self.seg_base + len(self.state.output_ids)
        return len(self.output)


def _finish_type(meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    fr = meta.get("finish_reason")
    if fr is None:
        return None, {}
    if isinstance(fr, dict):
        return str(fr.get("type")), fr
    return str(fr), {}


class SGLangEngine:
    """Engine on ``sglang.Engine`` (GPU). ``engine_args`` are ServerArgs fields (strings are converted)."""

    def __init__(self, model_path: str, *, engine_args: Mapping[str, object] | None = None,
                 name: str = "sglang", weight_bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> None:
        self.model_path = str(model_path)
        self.name = name
        self.weight_bucket_bytes = weight_bucket_bytes
        user = convert_engine_args(dict(engine_args or {}))
        for key, want in FORCED_ARGS.items():
            if key in user and user[key] != want:
                raise ValueError(f"engine argument {key}={user[key]!r} is not supported: rollwire needs {want!r}")
        self.server_kwargs: dict[str, Any] = {**DEFAULT_ARGS, **user, **FORCED_ARGS, "model_path": self.model_path}
        self._ckpt = _read_checkpoint(self.model_path)
        self.vocab_size = self._ckpt.vocab_size
        self.eos_token_ids = list(self._ckpt.eos_token_ids)
        self.max_model_len = int(user.get("context_length") or self._ckpt.max_position_embeddings)
        self.deterministic = bool(self.server_kwargs.get("enable_deterministic_inference", False))
        self.tp_size = int(self.server_kwargs.get("tp_size") or 1)
        self._dtype = str(user.get("dtype") or self._ckpt.dtype)
        self._eng: Any = None
        self._tm: Any = None
        self._io: Any = None  # sglang.srt.managers.io_struct
        self._serializer: Any = None
        self._mask_processor = _TokenMask.to_str()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._version = 0
        self._live: dict[str, _Live] = {}
        self._rids = itertools.count()
        self._rid_prefix = f"rw{os.getpid():x}-"
        self._paused = False
        self._sched_paused = ""  # mode of the pause SGLang's scheduler is in ("" = running)
        self._released: set[str] = set()
        self._weights_sent = True  # False from a weights release until the next update_weights
        self._closed = False
        self._changed = asyncio.Event()  # replaced by a fresh one at each pulse
        self._lock: asyncio.Lock | None = None  # control operations, one at a time
        self.startup_s = 0.0
        self.loop_is_engine_loop: bool | None = None

    # -- protocol -------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        gpu = int(self.server_kwargs.get("base_gpu_id") or 0)
        device = f"cuda:{gpu}" if self.tp_size == 1 else f"cuda:{gpu}-{gpu + self.tp_size - 1}"
        held = sum(1 for s in self._live.values() if not s.submitted and not s.done)
        return EngineInfo(
            name=self.name, vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids),
            max_model_len=self.max_model_len, weight_version=self._version, device=device, dtype=self._dtype,
            extra={
                "weights_bytes": 0 if "weights" in self._released else self._ckpt.nbytes,
                "live": len(self._live), "waiting": held,
                "in_sglang": sum(1 for s in self._live.values() if s.submitted),
                "paused": self._paused, "released": sorted(self._released),
                "weights_sent": self._weights_sent, "startup_s": round(self.startup_s, 2),
                "loop_is_engine_loop": self.loop_is_engine_loop, "deterministic": self.deterministic,
            },
        )

    async def start(self) -> None:
        """Build the ``sglang.Engine`` on the running loop (blocks it for the engine's start-up)."""
        if self._eng is not None:
            return
        import sglang
        from sglang.srt.managers import io_struct
        from sglang.srt.utils import MultiprocessingSerializer

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._eng = sglang.Engine(**self.server_kwargs)
        self.startup_s = time.monotonic() - t0
        self.loop_is_engine_loop = self._eng.loop is loop
        if not self.loop_is_engine_loop:
            raise RuntimeError("sglang.Engine did not keep the running event loop; rollwire cannot drive it")
        self._loop = loop
        self._tm = self._eng.tokenizer_manager
        self._io = io_struct
        self._serializer = MultiprocessingSerializer
        self._lock = asyncio.Lock()
        self._keep_sigterm_handler()
        self._tm.auto_create_handle_loop()  # its receive task, on this loop
        mc = getattr(self._tm, "model_config", None)
        if mc is not None:
            self.vocab_size = int(getattr(mc, "vocab_size", self.vocab_size))
            self._dtype = str(getattr(mc, "dtype", self._dtype)).removeprefix("torch.")
        ctx = getattr(self._tm, "context_len", None)
        if ctx:
            self.max_model_len = int(ctx)
        log.info("sglang engine started in %.1fs (loop kept: %s)", self.startup_s, self.loop_is_engine_loop)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pulse()
        if self._eng is None:
            return
        submitted = [s for s in self._live.values() if s.submitted and not s.done]
        if submitted:
            with contextlib.suppress(Exception):
                if self._sched_paused == "in_place":  # a running request only finishes at a step
                    await self._pause_scheduler("retract")
                for s in submitted:
                    s.abort_requested = True
                    self._tm.abort_request(s.srid)
                await self._wait_states_finished(submitted, 10.0)
        for s in list(self._live.values()):  # whatever is left ends here, with "abort"
            s.killed = True
            if s.pending is not None and not s.pending.done():
                s.pending.cancel()
            st = s.state
            if st is not None and not isinstance(st, _StateView) and not st.finished:
                st.finished = True
                st.out_list.append({"output_ids": st.output_ids, "meta_info": {"finish_reason": {"type": "abort"}}})
                st.event.set()
        await asyncio.sleep(0)
        for task in list(getattr(self._tm, "asyncio_tasks", ())):
            task.cancel()
        eng, self._eng = self._eng, None
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)

    def validate(self, req: EngineRequest) -> None:
        ids, p, vocab = req.input_ids, req.params, self.vocab_size
        if not ids:
            raise EngineError("empty_input", "input_ids is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise EngineError("token_out_of_range", f"input ids must lie in [0, {vocab})")
        if (bad := check_params(p, vocab)) is not None:
            raise EngineError("bad_sampling_params", bad)
        if p.seed is not None and p.temperature > 0 and not self.deterministic:
            raise EngineError("bad_sampling_params", "a per-request seed needs the sglang engine started with "
                                                     "--engine-arg enable_deterministic_inference=true")
        if len(ids) + p.max_new_tokens > self.max_model_len:
            raise EngineError("too_long", f"{len(ids)} prompt + {p.max_new_tokens} new tokens exceed "
                                          f"max_model_len {self.max_model_len}")

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.validate(req)
        if self._closed:
            raise EngineError("shutting_down", "engine is shut down")
        if self._eng is None:
            raise EngineError("internal", "engine not started")
        if req.rid in self._live:
            raise EngineError("duplicate_request", f"request {req.rid!r} is already live")
        s = _Live(req)
        self._live[req.rid] = s
        try:
            while True:
                while not self._runnable() and not s.abort_requested and not self._closed:
                    await self._changed.wait()
                if s.abort_requested or self._closed:
                    yield self._final(s, "abort")
                    return
                async with contextlib.aclosing(self._run_segment(s)) as segment:
                    async for d in segment:
                        yield d
                        if d.finish_reason is not None:
                            return
                # the segment ended without finishing: evicted; wait, then submit the rest
        finally:
            if s.submitted and not s.done:  # the consumer went away: stop spending steps on it
                with contextlib.suppress(Exception):
                    self._tm.abort_request(s.srid)
            s.done = True
            if s.pending is not None and not s.pending.done():
                s.pending.cancel()
            if self._live.get(req.rid) is s:
                del self._live[req.rid]

    async def abort(self, rid: str) -> None:
        s = self._live.get(rid)
        if s is None or s.done or s.abort_requested:
            return
        s.abort_requested = True
        if s.submitted:
            self._tm.abort_request(s.srid)
        else:
            self._pulse()  # held or evicted: its generate() ends now

    async def pause(self, mode: PauseMode) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError("bad_pause_mode", f"unknown pause mode {mode!r}")
        assert self._lock is not None, "engine not started"
        async with self._lock:
            self._paused = True
            self._pulse()
            if mode == "abort":
                for s in self._live.values():
                    s.abort_requested = True
                self._pulse()
                inside = [s for s in self._live.values() if s.submitted and not s.done]
                await self._pause_scheduler("retract")
                for s in inside:
                    self._tm.abort_request(s.srid)
                await self._wait_states_finished(inside, _EVICT_TIMEOUT_S)
            elif not self._released:  # released: the scheduler is paused already, with nothing inside
                await self._pause_scheduler(mode)

    async def resume(self) -> None:
        assert self._lock is not None, "engine not started"
        async with self._lock:
            self._paused = False
            if not self._weights_sent:
                log.warning("resuming without re-sent weights: outputs are garbage until update_weights")
            if not self._released:
                await self._continue_scheduler()
            self._pulse()

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor, then load them in buckets of ``weight_bucket_bytes``."""
        if not self._paused:
            raise EngineError("not_paused", "update_weights needs a paused engine")
        if "weights" in self._released:
            raise EngineError("weights_failed", "weights are released: resume_memory(['weights']) first")
        items = list(named_tensors)
        self._check_tensors(items)
        assert self._lock is not None
        async with self._lock:
            # SGLang's flush after a load asserts an idle scheduler; released KV was flushed already
            flush = not any(s.submitted for s in self._live.values()) and "kv_cache" not in self._released
            buckets = _buckets(items, self.weight_bucket_bytes) if items else []
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1
                payload = self._serializer.serialize(_stage_cpu(bucket))
                obj = self._io.UpdateWeightsFromTensorReqInput(
                    serialized_named_tensors=[payload] * self.tp_size, flush_cache=flush and last,
                    abort_all_requests=False, weight_version=str(version) if last else None)
                ok, message = await self._tm.update_weights_from_tensor(obj, None)
                if not ok:
                    raise EngineError("weights_failed", f"bucket {i + 1}/{len(buckets)}: {message}")
            for s in self._live.values():
                s.marks.append((s.produced(), self._version))
            self._version = version
            self._weights_sent = True

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None:
        """Frees GPU memory by tag (SGLang's torch_memory_saver). Needs a paused engine; requests
        inside SGLang are evicted first and re-submitted once the engine runs again. Released
        weights are lost: resume_memory(["weights"]), then update_weights with every tensor."""
        _check_tags(tags)
        if not self._paused:
            raise EngineError("not_paused", "release_memory needs a paused engine")
        new = [t for t in ALL_MEMORY_TAGS if t in tags and t not in self._released]
        if not new:
            return
        assert self._lock is not None
        async with self._lock:
            await self._evict()
            await self._tm.release_memory_occupation(self._io.ReleaseMemoryOccupationReqInput(tags=list(new)), None)
            self._released.update(new)
            if "weights" in new:
                self._weights_sent = False

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None:
        _check_tags(tags)
        back = [t for t in ALL_MEMORY_TAGS if t in tags and t in self._released]
        if not back:
            return
        assert self._lock is not None
        async with self._lock:
            await self._tm.resume_memory_occupation(self._io.ResumeMemoryOccupationReqInput(tags=list(back)), None)
            self._released.difference_update(back)
            if not self._released and not self._paused:  # resume() came first: run now
                await self._continue_scheduler()
            self._pulse()

    async def flush_cache(self) -> None:
        """Drops SGLang's prefix cache. Refused (busy) while requests run unpaused; while paused,
        requests inside SGLang are evicted first (they re-prefill on resume)."""
        if not self._paused and any(not s.done for s in self._live.values()):
            raise EngineError("busy", "flush_cache while requests are running; pause first")
        assert self._lock is not None
        async with self._lock:
            if "kv_cache" in self._released:
                return  # released KV was flushed by SGLang then
            if self._paused:
                await self._evict()
            out = await self._tm.flush_cache()
            if not getattr(out, "success", True):
                raise EngineError("busy", f"sglang refused to flush: {getattr(out, 'message', '')}")

    # -- SGLang requests -----------------------------------------------------------------------

    def _sampling_params(self, s: _Live) -> dict[str, Any]:
        p = s.req.params
        sp: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens - len(s.output), "temperature": float(p.temperature),
            "top_p": float(p.top_p), "top_k": int(p.top_k), "min_p": float(p.min_p),
            "ignore_eos": bool(p.ignore_eos), "no_stop_trim": True,
        }
        if p.stop_token_ids:
            sp["stop_token_ids"] = [int(t) for t in p.stop_token_ids]
        if self.deterministic:  # SGLang seeds every row then: unseeded requests get a fresh seed
            sp["sampling_seed"] = int(p.seed) if p.seed is not None else random.getrandbits(62)
        if p.allowed_token_ids is not None or p.disallowed_token_ids:
            sp["custom_params"] = {"rw_allowed": list(p.allowed_token_ids) if p.allowed_token_ids is not None else None,
                                   "rw_disallowed": list(p.disallowed_token_ids or [])}
        return sp

    async def _run_segment(self, s: _Live) -> AsyncGenerator[EngineDelta, None]:
        """Submit prompt + output so far; stream until SGLang ends the request."""
        req = s.req
        sp = self._sampling_params(s)
        # SGLang's ignore_eos also disables stop_token_ids: then the stop ids are watched here
        local_stops = frozenset(req.params.stop_token_ids) if req.params.ignore_eos else frozenset()
        s.srid = f"{self._rid_prefix}{next(self._rids):012x}"
        s.seg_base = len(s.output)
        s.evicting = False
        obj = self._io.GenerateReqInput(
            input_ids=list(req.input_ids) + s.output, sampling_params=sp, return_logprob=req.return_logprob,
            stream=True, rid=s.srid, extra_key=f"rw-v{self._version}",
            custom_logit_processor=self._mask_processor if "custom_params" in sp else None)
        agen = self._tm.generate_request(obj, None)
        try:
            first = s.pending = asyncio.ensure_future(agen.__anext__())
            await asyncio.sleep(0)  # its first step registers the ReqState that outputs are read from
            s.state = self._tm.rid_to_state.get(s.srid)
            while True:
                try:
                    out = await first if first is not None else await agen.__anext__()
                except StopAsyncIteration:
                    out = None
                except asyncio.CancelledError:
                    if not s.killed:
                        raise
                    out = None  # shutdown gave up on SGLang's answer
                except ValueError as e:  # SGLang refused the request
                    raise EngineError("bad_sampling_params", f"sglang: {e}") from None
                first = s.pending = None
                meta = out["meta_info"] if out is not None else {}
                if s.state is None and out is not None and isinstance(out.get("output_ids"), list):
                    s.state = _StateView(out)  # no ReqState seen (should not happen): read the output itself
                kind, fr = _finish_type(meta) if out is not None else ("abort", {})
                new_ids, new_lps = self._take_new(s)
                cached = int(meta.get("cached_tokens") or 0)
                hit = next((i for i, t in enumerate(new_ids) if t in local_stops), None) if local_stops else None
                if hit is not None:
                    new_ids = new_ids[: hit + 1]
                    new_lps = new_lps[: hit + 1] if new_lps is not None else None
                    if kind is None:
                        self._tm.abort_request(s.srid)  # the tokens it makes past the stop are dropped
                    kind, fr = "stop", {}
                if kind is None:
                    for d in self._deltas(s, new_ids, new_lps, None, cached):
                        yield d
                    continue
                s.srid, s.state = "", None
                if kind == "abort" and fr.get("status_code") not in (None, 200) and not s.abort_requested:
                    raise EngineError("internal", f"sglang: {fr.get('message', fr)}")
                if kind == "abort" and s.evicting and not s.abort_requested and not self._closed:
                    for d in self._deltas(s, new_ids, new_lps, None, cached):
                        yield d
                    return  # evicted: generate() re-submits the rest later
                reason: FinishReason = "abort" if kind == "abort" else "length" if kind == "length" else "stop"
                for d in self._deltas(s, new_ids, new_lps, reason, cached):
                    yield d
                return
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()

    def _take_new(self, s: _Live) -> tuple[list[int], list[float] | None]:
        st = s.state
        if st is None:
            return [], [] if s.req.return_logprob else None
        have = len(s.output) - s.seg_base
        ids = [int(t) for t in st.output_ids[have:]]
        lps: list[float] | None = None
        if s.req.return_logprob:
            vals = st.output_token_logprobs_val
            lps = [float(x) for x in vals[have: have + len(ids)]]
        return ids, lps

    def _deltas(self, s: _Live, ids: list[int], lps: list[float] | None, reason: FinishReason | None,
                cached: int) -> list[EngineDelta]:
        """Book ``ids`` and cut them into one delta per weight version (the last carries ``reason``)."""
        start = len(s.output)
        s.output.extend(ids)
        if lps is not None:
            s.logprobs.extend(lps)
        runs: list[tuple[int, int, int]] = []  # (version, from, to) over the new tokens
        if not s.marks or s.marks[-1][0] <= start:  # the usual case: every new token is the live version's
            runs.append((self._version, 0, len(ids)))
        for k in range(len(ids) if not runs else 0):
            v = self._version_of(s, start + k)
            if runs and runs[-1][0] == v:
                runs[-1] = (v, runs[-1][1], k + 1)
            else:
                runs.append((v, k, k + 1))
        if not runs:
            runs = [(self._version, 0, 0)]
        out = []
        for i, (v, a, b) in enumerate(runs):
            last = i == len(runs) - 1
            out.append(EngineDelta(rid=s.req.rid, token_ids=ids[a:b], logprobs=lps[a:b] if lps is not None else None,
                                   weight_version=v, finish_reason=reason if last else None,
                                   cached_tokens=cached if i == 0 else 0))
        if reason is not None:
            s.done = True
        return [d for d in out if d.token_ids or d.finish_reason is not None]

    def _version_of(self, s: _Live, index: int) -> int:
        for produced, version in s.marks:
            if index < produced:
                return version
        return self._version

    def _final(self, s: _Live, reason: FinishReason) -> EngineDelta:
        s.done = True
        return EngineDelta(rid=s.req.rid, token_ids=[], logprobs=[] if s.req.return_logprob else None,
                           weight_version=self._version, finish_reason=reason)

    # -- scheduler control ---------------------------------------------------------------------

    def _runnable(self) -> bool:
        return not (self._paused or self._released or self._closed)

    def _pulse(self) -> None:
        """Wake every generate() waiting for the engine to run (or for its abort)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sync(self) -> None:
        """Round trip to the scheduler: it has handled everything sent before, and the outputs of
        steps before that have been handled here (they travel on another socket: give it a moment)."""
        await self._tm.get_internal_state()
        await asyncio.sleep(0.002)

    async def _pause_scheduler(self, mode: str) -> None:
        await self._tm.pause_generation(self._io.PauseGenerationReqInput(mode=mode))
        await self._sync()
        self._sched_paused = mode

    async def _continue_scheduler(self) -> None:
        if self._sched_paused:
            await self._tm.continue_generation(self._io.ContinueGenerationReqInput())
            self._sched_paused = ""

    async def _evict(self) -> None:
        """Take every request out of SGLang (to be re-submitted later) so its scheduler is idle."""
        inside = [s for s in self._live.values() if s.submitted and not s.done]
        if self._sched_paused != "retract" or inside:
            await self._pause_scheduler("retract")  # running requests go back to the waiting queue
        if not inside:
            return
        for s in inside:
            s.evicting = True
            self._tm.abort_request(s.srid)
        await self._wait_states_finished(inside, _EVICT_TIMEOUT_S)

    async def _wait_states_finished(self, lives: list[_Live], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(s.state is not None and not s.state.finished for s in lives):
            if time.monotonic() > deadline:
                raise EngineError("internal", "sglang did not end the aborted requests in time")
            await asyncio.sleep(0.001)

    def _check_tensors(self, items: list[tuple[str, torch.Tensor]]) -> None:
        known = self._ckpt.tensors
        if not known:
            return  # no safetensors header to check against (e.g. a .bin checkpoint)
        want_dtype = self._dtype if self._dtype not in ("auto", "") else None
        for name, t in items:
            meta = known.get(name)
            if meta is None and name == "lm_head.weight" and self._ckpt.tied_embeddings:
                meta = known.get("model.embed_tokens.weight")
            if meta is None:
                raise EngineError("unknown_tensor", f"no parameter named {name!r}")
            shape, ckpt_dtype = meta
            if tuple(t.shape) != shape:
                raise EngineError("shape_mismatch", f"{name}: got {tuple(t.shape)}, want {shape}")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != (want_dtype or ckpt_dtype):
                raise EngineError("dtype_mismatch", f"{name}: got {dtype}, want {want_dtype or ckpt_dtype}")

    def _keep_sigterm_handler(self) -> None:
        """The TokenizerManager replaces the loop's SIGTERM handler with one that drains and kills the
        process tree. Make its SIGTERM raise SIGINT instead, which rollwire serve stops on cleanly."""
        import signal

        from sglang.srt.managers import tokenizer_manager as tm_mod

        base = getattr(tm_mod, "SignalHandler", None)
        if base is None or not hasattr(self._tm, "signal_handler_class"):
            return

        class _Handler(base):  # type: ignore[misc, valid-type]
            def sigterm_handler(self, signum: Any = None, frame: Any = None) -> None:
                signal.raise_signal(signal.SIGINT)

        self._tm.signal_handler_class = _Handler


class _StateView:
    """A stand-in ReqState built from one output (only used if SGLang's state was not found)."""

    def __init__(self, out: Mapping[str, Any]) -> None:
        self.output_ids = out.get("output_ids") or []
        self.output_token_logprobs_val = [x[0] for x in out.get("meta_info", {}).get("output_token_logprobs") or []]
        self.finished = False


def _buckets(items: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy packing in order; a tensor larger than a bucket goes alone."""
    out: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        if not out or size + n > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, t.detach()))
        size += n
    return out


def _stage_cpu(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """CPU tensors of a bucket copied into one shared-memory block (one handle for SGLang's
    scheduler to open; any source storage works, read-only frames and mmaps included). CUDA
    tensors travel as CUDA IPC handles, unchanged."""
    todo = [i for i, (_, t) in enumerate(bucket) if t.device.type == "cpu" and not t.is_shared()]
    if not todo:
        return bucket
    sizes = {i: bucket[i][1].numel() * bucket[i][1].element_size() for i in todo}
    flat = torch.empty(sum((n + 63) // 64 * 64 for n in sizes.values()), dtype=torch.uint8).share_memory_()
    out = list(bucket)
    off = 0
    for i in todo:
        name, t = bucket[i]
        view = flat[off: off + sizes[i]].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[i] = (name, view)
        off += (sizes[i] + 63) // 64 * 64
    return out


def _check_tags(tags: Sequence[str]) -> None:
    bad = [t for t in tags if t not in ALL_MEMORY_TAGS]
    if bad:
        raise EngineError("unknown_tag", f"unknown memory tags {bad}; known: {list(ALL_MEMORY_TAGS)}")
