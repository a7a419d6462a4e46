"""The SGLang engine: the Engine protocol on ``sglang.Engine`` in token-in/token-out mode.

Importing this module needs SGLang (``pip install 'rollwire[sglang]'``); nothing else in rollwire
imports it. The ``sglang.Engine`` is built in ``start()``, on the event loop that will drive it
(SGLang keeps the running loop as ``eng.loop`` and runs the TokenizerManager's tasks there).
Everything after that is a coroutine on that loop talking to the TokenizerManager directly:
``Engine``'s own synchronous methods call ``loop.run_until_complete`` and cannot be used from
inside the running loop. Modules: ``args`` (engine arguments, checkpoint facts),
``requests`` (one request's segments, outputs, version spans), ``weights`` (CUDA
IPC / shared-memory and NCCL loading), ``logits`` (the custom logit processor).

How the protocol maps onto SGLang 0.5.x, and the traps each mapping avoids:

* generate: ``TokenizerManager.generate_request`` with ``input_ids``. ``EngineRequest.stream``
  requests are streamed from SGLang (new tokens and logprobs read from the request's
  ``ReqState``, so nothing is lost when several outputs queue up between two reads); others are
  one non-streamed SGLang request whose output arrives at the finish (SGLang's streaming path
  costs more than half of its throughput on a small model: bench/results/sglang_throughput.json).
  Each engine request gets a fixed-width SGLang rid: SGLang aborts by rid *prefix*, and fixed
  width makes rids prefix-free.
* weight version per token: when a version goes live, the number of tokens each live request
  has produced is recorded; tokens before that mark belong to the old version. The count must be
  exact at that moment, and a retracted request must not reuse old-version KV, so before a switch
  (``_prepare_switch``): after a ``retract`` pause every request inside SGLang is evicted (its
  tokens so far come back; the rest is re-submitted under the new version's cache key; left in
  SGLang's queue it would re-prefill from its own old-weights KV in the radix cache); after an
  ``in_place`` pause non-streamed requests are evicted, and under SGLang's overlap scheduler,
  which leaves one step of the old weights in flight, the pause is turned into a ``retract``
  (SGLang then processes that step first; the requests keep their cached KV). With
  ``--engine-arg disable_overlap_schedule=true`` an ``in_place`` pause is exact as it is.
* allowed/disallowed token masks: a custom logit processor (``logits.TokenMask``), so the
  engine is always started with ``enable_custom_logit_processor=True``. Logprobs are SGLang's:
  log_softmax(masked logits / T) before top-k/top-p/min-p, as the hf engine reports them.
* seed: SGLang honours ``sampling_seed`` only with ``enable_deterministic_inference``; without
  it a request with a seed is refused (bad_sampling_params) rather than silently unseeded. With
  it, SGLang's pytorch sampler asserts (and its scheduler dies) on min_p > 0, so there min_p is
  applied by the logit processor (same kept set), and min_p with logprobs is refused (SGLang
  would report logprobs normalised over the kept tokens only). Its seeded draw hashes token ids
  on the plain path but sorted ranks once any row of the batch truncates, so every sampled row
  gets a top_k that keeps the whole vocabulary: one path, the same tokens whatever the batch.
  Its batch-invariant matmuls run float32 as TF32: logprobs of a float32 model are ~1e-2 off
  a float32 forward pass.
* min_p / top_p at the limit: SGLang computes logits in the model's dtype (bf16 usually) and
  casts them to float32, so the top tokens are often exactly tied. Greedy (argmax) then takes
  the lowest id, while min_p keeps every tied token and samples among them: min_p=0.999 does
  not reproduce greedy on a bf16 model (it does on float32 ones), and is not a bug.
* pause(abort|retract|in_place): ``pause_generation`` is fire-and-forget to the scheduler, so each
  pause is followed by a round trip to the scheduler; when it returns no step is running and the
  outputs of earlier steps have been handled. ``abort`` is done as retract + abort of every
  request (SGLang's own abort mode polls once a second). With nothing of ours inside SGLang the
  scheduler is not paused (new requests wait in the adapter). See ``control``.
* update_weights: ``update_weights_from_tensor`` in buckets of 1 GiB (tiny buckets have garbled
  outputs on large models); CUDA buckets in SGLang's ``flattened_bucket`` format (one IPC handle
  per bucket), ``abort_all_requests=False`` (the default of
  ``update_weight_version`` would undo a retract/in_place pause), the version passed along as
  ``weight_version``. SGLang's flush after a load asserts that the scheduler is idle, so the
  cache is flushed only when no request is inside SGLang; requests carry
  ``extra_key=rw-v<weight version>`` so a prefix computed under old weights is never reused by a
  request started under new ones. NCCL: ``join_weight_group`` + ``update_weights_from_distributed``
  (``weights`` says how the trainer takes part).
* sessions: SGLang's radix cache already reuses the KV of a resent history, so a session needs
  no SGLang session object; ``close_session`` forgets the session's cache key. A request with
  ``keep_stale_prefix`` keeps its session's first cache key across versions, so it can reuse a
  history computed by older weights while SGLang still caches it (no flush after a load while
  sessions are open). ``cached_tokens`` of the first delta is SGLang's ``meta_info["cached_tokens"]``.
* release_memory: SGLang asserts an idle scheduler and loses the weights (resume, then re-send
  them). Requests still inside SGLang are *evicted* first: aborted there, kept here, and
  re-submitted (prompt + output so far, the remaining token budget) once the engine runs again,
  which is what a retract does. flush_cache evicts the same way when paused.
* engine death: when a scheduler process dies SGLang's watchdog sends SIGQUIT to this process,
  whose default handlers (``custom_sigquit_handler`` while starting, the TokenizerManager's
  ``running_phase_sigquit_handler`` after) kill the whole process tree with SIGKILL. Both are
  replaced. A scheduler killed outright (SIGKILL, the OOM killer) sends nothing, so the processes
  ``sglang.Engine`` started here (multiprocessing children) are also watched every
  ``WATCH_CHILDREN_S``. Either way the engine marks itself dead (``_die``), every live request's generate() raises
  ``EngineError("engine_dead")`` at once, new ones are refused the same way, and the death
  callback (the GenerationActor's, which then stops the server with exit status 1) is told.
* stop_token_ids with ignore_eos: SGLang's ignore_eos also switches its stop ids off, so then the
  adapter streams the request, watches for them itself, ends it with "stop" and aborts it
  inside SGLang.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

if importlib.util.find_spec("sglang") is None:  # the server turns this into "pip install 'rollwire[sglang]'"
    raise ImportError("rollwire.engines.sglang needs SGLang: pip install 'rollwire[sglang]'")

from rollwire.engines.base import (
    ENGINE_DEAD,
    EngineDelta,
    EngineError,
    EngineInfo,
    EngineRequest,
    MemoryTag,
)
from rollwire.engines.sglang import args as sglang_args
from rollwire.engines.sglang import compat
from rollwire.engines.sglang.admission import Slots
from rollwire.engines.sglang.args import (
    DEFAULT_ARGS,
    FORCED_ARGS,
    convert_engine_args,
    env_engine_args,
    read_checkpoint,
)
from rollwire.engines.sglang.control import ControlMixin
from rollwire.engines.sglang.logits import TokenMask
from rollwire.engines.sglang.payloads import FlatStaging
from rollwire.engines.sglang.requests import Live, RequestsMixin
from rollwire.engines.sglang.weights import WeightsMixin
from rollwire.engines.validation import check_request
from rollwire.messages.errors import ErrorCode

__all__ = ["SGLangEngine", "convert_engine_args"]

log = logging.getLogger(__name__)

# per update_weights_from_tensor call: each costs a scheduler round trip (~5 ms on an H100), and a
# CUDA bucket this process opened from the trainer is copied once (a bucket of transient memory)
WEIGHT_BUCKET_BYTES = 1 << 30
WATCH_CHILDREN_S = 0.5  # how often the processes sglang.Engine started are checked for life


_STARTING: dict[int, weakref.ref[SGLangEngine]] = {}  # engines by SigquitWhileStarting key, this process
_KEYS = itertools.count(1)


class SigquitWhileStarting:
    """ServerArgs.custom_sigquit_handler. SGLang pickles ServerArgs into its scheduler processes,
    so the handler carries only a key to the engine (a bound method would carry the engine, its
    sockets and callbacks, which do not pickle); in this process the key finds the engine."""

    def __init__(self, engine: SGLangEngine) -> None:
        self.key = next(_KEYS)
        _STARTING[self.key] = weakref.ref(engine)
        weakref.finalize(engine, _STARTING.pop, self.key, None)

    def __call__(self, signum: Any = None, frame: Any = None) -> None:
        ref = _STARTING.get(self.key)
        engine = ref() if ref is not None else None
        if engine is not None:
            engine._sigquit_while_starting(signum, frame)
        else:
            log.error("sglang: a scheduler process died (SIGQUIT) and its engine is gone")


class SGLangEngine(RequestsMixin, WeightsMixin, ControlMixin):
    """Engine on ``sglang.Engine`` (GPU). ``engine_args`` are ServerArgs fields (strings are converted);
    defaults may come from ``ROLLWIRE_SGLANG_ENGINE_ARGS`` (see args)."""

    def __init__(self, model_path: str, *, engine_args: Mapping[str, object] | None = None,
                 name: str = "sglang", weight_bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> None:
        self.model_path = str(model_path)
        self.name = name
        self.weight_bucket_bytes = weight_bucket_bytes
        user = convert_engine_args(dict(engine_args or {}))
        for key, want in FORCED_ARGS.items():
            if key in user and user[key] != want:
                raise ValueError(f"engine argument {key}={user[key]!r} is not supported: rollwire needs {want!r}")
        env = convert_engine_args(env_engine_args())
        self.server_kwargs: dict[str, Any] = {**DEFAULT_ARGS, **env, **user, **FORCED_ARGS,
                                              "model_path": self.model_path}
        self._ckpt = read_checkpoint(self.model_path)
        self.vocab_size = self._ckpt.vocab_size
        self.eos_token_ids = list(self._ckpt.eos_token_ids)
        self.max_model_len = int(self.server_kwargs.get("context_length") or self._ckpt.max_position_embeddings)
        self.deterministic = bool(self.server_kwargs.get("enable_deterministic_inference", False))
        self.tp_size = int(self.server_kwargs.get("tp_size") or 1)
        self._dtype = str(self.server_kwargs.get("dtype") or self._ckpt.dtype)
        self._overlap = not self.server_kwargs.get("disable_overlap_schedule", False)  # SGLang's, after start
        self._eng: Any = None
        self._tm: Any = None
        self._io: Any = None  # sglang.srt.managers.io_struct
        self._serializer: Any = None
        self._flat_staging = FlatStaging()
        self._flat_meta: Any = None
        self._mask_processor = TokenMask.to_str()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._version = 0
        self._live: dict[str, Live] = {}
        self._rids = itertools.count()
        self._rid_prefix = f"rw{os.getpid():x}-"
        self._paused = False
        self._sched_paused = ""  # mode of the pause SGLang's scheduler is in ("" = running)
        self._released: set[MemoryTag] = set()
        self._weights_sent = True  # False from a weights release (or a failed load) until a complete load
        self._closed = False
        self._dead: str | None = None  # why the engine died (SGLang's scheduler process gone)
        self._on_death: Callable[[str], None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # replaced by a fresh one at each pulse
        self._lock: asyncio.Lock | None = None  # control operations, one at a time
        self._session_keys: dict[str, str] = {}  # session id -> radix-cache key of its history
        self._leaving: set[str] = set()  # SGLang rids we aborted and forgot; SGLang may still run them
        self._groups: set[str] = set()  # NCCL weight groups joined
        self._slots = Slots(self._live, lambda srid: self._tm.abort_request(srid), self._runnable)  # fair share
        self.startup_s = 0.0
        self.loop_is_engine_loop: bool | None = None

    # -- protocol -------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    def info(self) -> EngineInfo:
        gpu = int(self.server_kwargs.get("base_gpu_id") or 0)
        device = f"cuda:{gpu}" if self.tp_size == 1 else f"cuda:{gpu}-{gpu + self.tp_size - 1}"
        held = sum(1 for s in self._live.values() if not s.submitted and not s.done)
        return EngineInfo(
            name=self.name, vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids),
            max_model_len=self.max_model_len, weight_version=self._version, device=device, dtype=self._dtype,
            weights_complete=self._weights_sent and not self._released,
            extra={
                "weights_bytes": 0 if "weights" in self._released else self._ckpt.nbytes,
                "live": len(self._live), "waiting": held,
                "in_sglang": sum(1 for s in self._live.values() if s.submitted),
                "paused": self._paused, "released": sorted(self._released),
                "weights_sent": self._weights_sent, "startup_s": round(self.startup_s, 2),
                "loop_is_engine_loop": self.loop_is_engine_loop, "deterministic": self.deterministic,
                "overlap_schedule": self._overlap, "sessions": len(self._session_keys),
                "weight_groups": sorted(self._groups),
                **self._slots.info(),
            },
        )

    async def start(self) -> None:
        """Build the ``sglang.Engine`` on the running loop (blocks it for the engine's start-up)."""
        if self._eng is not None:
            return
        import sglang

        compat.check_version(str(getattr(sglang, "__version__", "unknown")))  # before anything of it runs
        from sglang.srt.managers import io_struct
        from sglang.srt.utils import MultiprocessingSerializer

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        import multiprocessing

        before = set(multiprocessing.active_children())
        kwargs = dict(self.server_kwargs)
        if "custom_sigquit_handler" in sglang_args.server_arg_types():  # a dead scheduler must not kill us
            kwargs["custom_sigquit_handler"] = SigquitWhileStarting(self)
        self._eng = sglang.Engine(**kwargs)
        self.startup_s = time.monotonic() - t0
        self.loop_is_engine_loop = self._eng.loop is loop
        if not self.loop_is_engine_loop:
            raise RuntimeError("sglang.Engine did not keep the running event loop; rollwire cannot drive it")
        self._loop = loop
        self._tm = self._eng.tokenizer_manager
        children = [p for p in multiprocessing.active_children() if p not in before]  # schedulers, detokenizer
        self._watchdog = loop.create_task(self._watch_children(children), name=f"{self.name}-watchdog")
        self._io = io_struct
        self._serializer = MultiprocessingSerializer
        try:  # CUDA buckets go as one flat tensor each (one IPC handle, not one per tensor)
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
            self._flat_meta = FlattenedTensorMetadata
        except ImportError:
            self._flat_meta = None
        self._lock = asyncio.Lock()
        self._keep_sigterm_handler()
        self._tm.auto_create_handle_loop()  # its receive task, on this loop
        # Move everything built so far (SGLang, torch, the model) out of the garbage collector's
        # reach, here and in the scheduler, as SGLang advises (its "LONG GARBAGE COLLECTION"
        # warning): this process allocates per request and message, and each full collection
        # would scan all of it while the event loop waits
        if hasattr(self._tm, "freeze_gc"):
            await self._tm.freeze_gc()
        facts = compat.engine_facts(self._tm)
        self.vocab_size = facts.get("vocab_size", self.vocab_size)
        self._dtype = facts.get("dtype", self._dtype)
        self.max_model_len = facts.get("context_len", self.max_model_len)
        if "disable_overlap_schedule" in facts:  # SGLang may switch it off itself
            self._overlap = not facts["disable_overlap_schedule"]
        self._slots.fair.capacity = await compat.max_running_requests(self._tm)
        log.info("sglang engine started in %.1fs (loop kept: %s, overlap scheduler: %s)", self.startup_s,
                 self.loop_is_engine_loop, self._overlap)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pulse()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._slots.close()
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
            if s.state is not None and not isinstance(s.state, compat.StateView):
                compat.end_as_aborted(s.state)
        await asyncio.sleep(0)
        await self._close_groups()
        compat.cancel_background_tasks(self._tm)
        eng, self._eng = self._eng, None
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)

    def validate(self, req: EngineRequest) -> None:
        check_request(req, self.vocab_size, self.max_model_len)
        p = req.params
        if p.seed is not None and p.temperature > 0 and not self.deterministic:
            raise EngineError(ErrorCode.BAD_SAMPLING_PARAMS, "a per-request seed needs the sglang engine started with "
                                                     "--engine-arg enable_deterministic_inference=true")
        if self.deterministic and p.min_p > 0 and p.temperature > 0 and req.return_logprob:
            raise EngineError(ErrorCode.BAD_SAMPLING_PARAMS, "min_p with logprobs is not supported with "
                                                     "enable_deterministic_inference (SGLang asserts on min_p "
                                                     "with a sampling seed)")

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.validate(req)
        if self._dead is not None:
            raise EngineError(ENGINE_DEAD, self._dead)
        if self._closed:
            raise EngineError(ErrorCode.SHUTTING_DOWN, "engine is shut down")
        if self._eng is None:
            raise EngineError(ErrorCode.INTERNAL, "engine not started")
        if req.rid in self._live:
            raise EngineError(ErrorCode.DUPLICATE_REQUEST, f"request {req.rid!r} is already live")
        s = Live(req)
        self._live[req.rid] = s
        try:
            while True:
                # a slot first, then the engine running: a slot is kept through a pause (what runs
                # inside SGLang is paused too), so a weight push does not reshuffle the queue
                holds_slot = await self._slots.acquire(
                    s, lambda: self._changed, lambda: s.abort_requested or self._closed or self._dead is not None)
                try:
                    while not self._runnable() and not s.abort_requested and not self._closed and self._dead is None:
                        await self._changed.wait()
                    if self._dead is not None:
                        raise EngineError(ENGINE_DEAD, self._dead)
                    if s.abort_requested or self._closed:
                        yield self._final(s, "abort")
                        return
                    async with contextlib.aclosing(self._run_segment(s)) as segment:
                        async for d in segment:
                            if holds_slot and not s.submitted:  # SGLang ended it: the slot is free now,
                                holds_slot = False  # not once a slow consumer has taken this delta
                                self._slots.release(s)
                            yield d
                            if d.finish_reason is not None:
                                return
                finally:
                    if holds_slot:
                        self._slots.release(s)
                # the segment ended without finishing: evicted; wait, then submit the rest
        finally:
            if s.submitted and not s.done:  # the consumer went away: stop spending steps on it
                with contextlib.suppress(Exception):
                    self._tm.abort_request(s.srid)
                self._leaving.add(s.srid)  # inside SGLang until its abort comes back
            s.done = True
            if s.pending is not None and not s.pending.done():
                s.pending.cancel()
            if self._live.get(req.rid) is s:
                del self._live[req.rid]
            self._slots.ended(s)

    async def abort(self, rid: str) -> None:
        s = self._live.get(rid)
        if s is None or s.done or s.abort_requested:
            return
        s.abort_requested = True
        if s.submitted:
            self._tm.abort_request(s.srid)
        else:
            self._pulse()  # held or evicted: its generate() ends now

    async def close_session(self, session_id: str) -> None:
        """Forget the session's cache key; its KV stays in SGLang's radix cache until evicted (LRU),
        where any later request with the same history under the same version may still reuse it."""
        self._session_keys.pop(session_id, None)

    # -- scheduler control ---------------------------------------------------------------------

    def _runnable(self) -> bool:
        # without a complete version loaded (after a weights release, or a failed load) SGLang's
        # weights are garbage: requests stay held here
        return not (self._paused or self._released or self._closed or not self._weights_sent)

    def _pulse(self) -> None:
        """Wake every generate() waiting for the engine to run (or for its abort); the engine may run
        again, so look at the shares too."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._slots.rebalance()

    def set_death_callback(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once, on the loop, when SGLang's scheduler dies (see ``_die``)."""
        self._on_death = callback
        if self._dead is not None:
            asyncio.get_running_loop().call_soon(callback, self._dead)

    def _sigquit_while_starting(self, signum: Any = None, frame: Any = None) -> None:
        """ServerArgs.custom_sigquit_handler: a plain signal handler (signal context): hand over to the loop."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._die, "sglang: a scheduler process died (SIGQUIT)")
        else:  # still inside sglang.Engine(): its start-up fails; the server exits non-zero on it
            log.error("sglang: a scheduler process died while the engine was starting (SIGQUIT)")

    async def _watch_children(self, procs: list[Any]) -> None:
        """A process sglang.Engine started that exits while the engine is open means it is dead."""
        while not self._closed and self._dead is None:
            await asyncio.sleep(WATCH_CHILDREN_S)
            gone = [p for p in procs if not p.is_alive()]
            if gone and not self._closed:
                p = gone[0]
                self._die(f"sglang: process {p.name} (pid {p.pid}) exited with status {p.exitcode}")

    def _die(self, reason: str) -> None:
        """SGLang's scheduler is gone: every live request ends with EngineError(ENGINE_DEAD) now (its
        generate() is woken: the pending read is cancelled, its ReqState finished), new ones are
        refused, and the death callback is told, once. ``shutdown`` then only reaps the processes."""
        if self._dead is not None:
            return
        self._dead = reason
        log.error("sglang engine dead: %s (%d requests live)", reason, len(self._live))
        for s in list(self._live.values()):
            s.killed = True
            s.srid = ""  # nothing to abort inside a dead scheduler
            if s.pending is not None and not s.pending.done():
                s.pending.cancel()
            if s.state is not None and not isinstance(s.state, compat.StateView):
                compat.end_as_aborted(s.state)
        self._pulse()
        if self._on_death is not None:
            asyncio.get_running_loop().call_soon(self._on_death, reason)

    def _keep_sigterm_handler(self) -> None:
        """The TokenizerManager replaces the loop's SIGTERM handler with one that drains and kills the
        process tree. Make its SIGTERM raise SIGINT instead, which rollwire serve stops on cleanly, and
        its SIGQUIT (a scheduler died) mark the engine dead instead of killing this process tree."""
        import signal

        compat.replace_signal_handlers(self._tm, lambda: signal.raise_signal(signal.SIGINT),
                                       lambda: self._die("sglang: a scheduler process died (SIGQUIT)"))
