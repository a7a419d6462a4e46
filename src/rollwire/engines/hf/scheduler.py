"""The hf engine's scheduler: an object the engine owns, holding the waiting queue, the running
batch and the single worker thread, and the task that steps them.

The loop reads plainly: wait to be woken, then while there is work and no pause, run steps back
to back (``_run_steps``). A step is: drop finished rows, give a row back to a client below its
share (``_fair_share``), admit joiners, then on the worker decode the running rows, prefill the
joiners and sample every row (``_compute``); its tokens are booked (``_book``) and handed out
while the next step computes. ``batch``, ``running`` and ``launched`` change only between
steps, on the loop; ``lock`` is held across a chain of steps, so whoever takes it (a pause, a
weight load, a memory release) knows no step is in flight.

Failures: a step that raises is isolated (``_isolate``: each member probed alone; only a culprit
fails); a failure outside any one request (the worker gone) kills the engine (``_die``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rollwire.engines.base import ENGINE_DEAD, EngineError, PauseMode
from rollwire.engines.hf import batch as hf_batch
from rollwire.engines.hf import prefix as hf_prefix
from rollwire.engines.hf.faults import Faults
from rollwire.engines.hf.requests import FairQueue, Seq, deliver
from rollwire.engines.hf.sampling import RowSampler, sample
from rollwire.engines.hf.weights import WeightStore
from rollwire.messages.errors import ErrorCode
from rollwire.messages.generate import FinishReason

log = logging.getLogger("rollwire.engines.hf")


class Scheduler:
    """Owns what the steps touch; the engine submits, aborts, pauses and loads through it."""

    MAX_PREFILL_TOKENS = 16384  # padded prompt tokens prefilled in one step (one long prompt always fits)

    def __init__(self, model: Any, *, device: torch.device, pad_id: int, max_batch_size: int,
                 weights: WeightStore, prefixes: hf_prefix.PrefixCache, name: str) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.weights = weights
        self.prefixes = prefixes
        self.name = name
        self.version = 0
        self.seqs: dict[str, Seq] = {}  # live requests by engine rid
        self.waiting = FairQueue()  # round-robin across clients
        self.running: list[Seq] = []  # row i of batch
        self.batch: hf_batch.Batch | None = None
        self.paused = False
        self.closed = False
        self.lock = asyncio.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rollwire-{name}")
        self.dead: str | None = None  # why the engine died (see _die); it serves nothing after
        self.on_death: Callable[[str], None] | None = None
        self.isolated = 0  # requests failed alone after a step failed
        self.preempted = 0  # rows that gave up their batch slot to a client below its share
        self.faults = Faults.parse()  # test hook (faults): None unless ROLLWIRE_HF_FAULTS is set
        self._stepping = False  # a step is on the worker
        self._launched: list[Seq] = []  # the requests of the last step launched
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what the engine calls ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"{self.name}-scheduler")

    async def shutdown(self) -> None:
        self.closed = True
        async with self.lock:
            for s in [*self.running, *self.waiting]:
                self._finish(s, "abort")
            self.running, self.batch = [], None
            self.waiting.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.pool.shutdown(wait=False)

    def submit(self, seq: Seq) -> None:
        self.seqs[seq.req.rid] = seq
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, rid: str) -> None:
        seq = self.seqs.get(rid)
        if seq is None or seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, "abort")
        elif self._stepping:
            seq.abort_requested = True  # the step in flight delivers its token, then "abort"
        else:
            self._finish(seq, "abort")  # its row is dropped at the next step

    async def pause(self, mode: PauseMode) -> None:
        """Stop stepping; returns once no step is in flight (see HFEngine.pause for the modes)."""
        self.paused = True
        async with self.lock:
            if mode == "abort":
                for s in [*self.running, *self.waiting]:
                    self._finish(s, "abort")
                self.waiting.clear()
                self.running, self.batch = [], None
            elif mode == "retract":
                self.retract()

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def load(self, copy: Callable[[], None], version: int) -> None:
        """Run ``copy`` on the worker with no step in flight, then make ``version`` live."""
        async with self.lock:
            await asyncio.get_running_loop().run_in_executor(self.pool, copy)
            self.version = version
            for s in self.running:  # kept their KV across the load (in_place): mixed versions
                s.kv_version = hf_prefix.STALE

    def busy(self) -> bool:
        """Requests running or waiting."""
        return any(not s.done for s in self.running) or bool(self.waiting)

    def set_death_callback(self, callback: Callable[[str], None]) -> None:
        self.on_death = callback
        if self.dead is not None:
            asyncio.get_running_loop().call_soon(callback, self.dead)

    # -- the loop -------------------------------------------------------------------------------

    def _can_step(self) -> bool:
        # restored-but-unloaded weights are garbage: never step on them (a complete load clears it)
        return not (self.paused or self.weights.released or self.weights.undefined or self.closed
                    or self.dead is not None) and bool(
            self.waiting or any(not s.done for s in self.running))

    async def _schedule(self) -> None:
        while not self.closed and self.dead is None:
            await self._wake.wait()
            self._wake.clear()
            while self._can_step():
                async with self.lock:
                    try:
                        await self._run_steps()
                    except Exception as e:  # outside any one request (launch, booking, the worker gone)
                        log.exception("hf engine failed outside a request")
                        self._die(f"hf engine worker failed: {type(e).__name__}: {e}")
                    finally:
                        self._stepping = False

    async def _run_steps(self) -> None:
        """Steps back to back while there is work and no pause. Step N+1 is launched as soon as
        step N's tokens are booked, and step N's deltas are handed out while N+1 computes."""
        step = self._launch() if self._can_step() else None
        while step is not None:
            fut, version, members = step
            try:
                batch, rows, toks, lps = await fut
            except Exception as e:
                log.warning("hf engine step failed (%s: %s); isolating it among its %d requests",
                            type(e).__name__, e, len(members))
                await self._isolate(members)
                return
            reasons = self._book(batch, rows, toks)
            step = self._launch() if self._can_step() else None
            for s, tok, lp, reason in zip(rows, toks, lps, reasons, strict=True):
                self._emit(s, [tok], [lp] if s.req.return_logprob else None, version, reason)

    def _launch(self) -> tuple[asyncio.Future[Any], int, list[Seq]] | None:
        """Drop finished rows, admit joiners, start one step on the worker (or None: no work)."""
        keep = []
        for i, s in enumerate(self.running):
            if s.abort_requested and not s.done:
                self._finish(s, "abort")
            if not s.done:
                keep.append(i)
        keep = self._fair_share(keep)
        joiners: list[Seq] = []
        longest = 0  # joiners are padded to the longest: bound the padded prefill of one step
        while self.waiting and len(keep) + len(joiners) < self.max_batch_size:
            s = self.waiting.peek()
            n = len(s.req.input_ids) + len(s.output)
            if joiners and (len(joiners) + 1) * max(longest, n) > self.MAX_PREFILL_TOKENS:
                break
            longest = max(longest, n)
            joiners.append(self.waiting.popleft())
            self._admit(s)
        members = [*(self.running[i] for i in keep), *joiners]
        if not members:
            self.running, self.batch = [], None
            self._stepping = False
            return None
        self._stepping = True
        self._launched = members
        if self.faults is not None and self.faults.worker_dies_now():  # test hook: the worker dies
            self.pool.shutdown(wait=False)
        fut = asyncio.get_running_loop().run_in_executor(
            self.pool, self._compute, self.batch, keep, members[:len(keep)], joiners)
        return fut, self.version, members

    def _fair_share(self, keep: list[int]) -> list[int]:
        """A full batch makes room for a client that waits with fewer rows than its share
        (``max_batch_size`` // clients with work): the client holding the most rows above its share
        gives up its newest one, which goes first in its own queue (re-prefilled when admitted
        again, as after a retract: its tokens so far are kept), and the waiting client takes the
        next turn. One row per waiting client per step."""
        waiting = self.waiting.clients() if len(keep) >= self.max_batch_size else []
        if not waiting:
            return keep
        held = collections.Counter(self.running[i].req.client for i in keep)
        share = max(1, self.max_batch_size // len(set(held) | set(waiting)))
        for client in waiting:
            if held[client] >= share:
                continue
            top, rows = held.most_common(1)[0]
            if rows <= share:
                break
            idx = next(i for i in reversed(keep) if self.running[i].req.client == top)
            keep.remove(idx)
            held[top] -= 1
            held[client] += 1
            self.waiting.put_back(self.running[idx])
            self.waiting.next_turn(client)
            self.preempted += 1
        return keep

    def _admit(self, s: Seq) -> None:
        """A joiner of the next step: find its session's cached prefix (KV computed now is of
        the live version). ``cached`` adds up over the prefills of a retracted request, as SGLang
        counts its ``cached_tokens``."""
        s.kv_version, s.prefix = self.version, None
        if s.req.session_id is not None:
            s.prefix = self.prefixes.lookup(s.req.session_id, s.req.input_ids + s.output, self.version,
                                             s.req.keep_stale_prefix)
            s.cached += s.prefix[1] if s.prefix is not None else 0
            if s.prefix is not None and s.prefix[0].version != self.version:
                s.kv_version = hf_prefix.STALE  # reused an older version's KV (keep_stale_prefix)

    def _keep_prefix(self, batch: hf_batch.Batch, row: int, s: Seq) -> None:
        """Keep a finished session request's KV for the session's next turn. The copy is queued
        on the worker ahead of any later step, so a step that uses the entry finds it filled."""
        assert s.req.session_id is not None
        tokens = s.req.input_ids + s.output[:-1]
        entry = hf_prefix.Entry(tokens=tokens, version=s.kv_version,
                                nbytes=hf_prefix.entry_bytes(batch, len(tokens)))
        self.prefixes.put(s.req.session_id, entry)
        self.pool.submit(hf_prefix.fill, entry, batch, row)
        self.prefixes.evict_to_budget()

    def _book(self, batch: hf_batch.Batch | None, rows: list[Seq], toks: list[int]) -> list[FinishReason | None]:
        """Record a step's tokens and decide who finished (their rids are free from here on)."""
        self.batch, self.running = batch, rows
        reasons: list[FinishReason | None] = []
        for i, (s, tok) in enumerate(zip(rows, toks, strict=True)):
            s.output.append(tok)
            reason: FinishReason | None = None
            if tok in s.stop_ids:
                reason = "stop"
            elif len(s.req.input_ids) + len(s.output) >= s.limit:
                reason = "length"
            elif s.abort_requested:
                reason = "abort"
            if reason is not None:
                s.done = True
                if self.seqs.get(s.req.rid) is s:
                    del self.seqs[s.req.rid]
                if s.req.session_id is not None and reason != "abort" and batch is not None:
                    self._keep_prefix(batch, i, s)
            reasons.append(reason)
        if all(s.done for s in rows):  # free the KV now rather than at the next step
            self.batch, self.running = None, []
        return reasons

    @torch.inference_mode()
    def _compute(self, batch: hf_batch.Batch | None, keep: list[int], rows: list[Seq], joiners: list[Seq],
                 ) -> tuple[hf_batch.Batch | None, list[Seq], list[int], list[float | None]]:
        """Worker thread: one decode of rows ``keep`` of ``batch`` (requests ``rows``) plus one
        prefill of the joiners; returns the new batch, its requests, their tokens and logprobs."""
        if self.faults is not None:
            self.faults.check_rows((s.req.rid, len(s.output)) for s in [*rows, *joiners])
        batch = hf_batch.select(batch, keep) if batch is not None else None
        rows = list(rows)
        logits = []
        if rows:
            assert batch is not None
            last = torch.tensor([s.output[-1] for s in rows], dtype=torch.long).to(self.device)
            batch, lg = hf_batch.decode(self.model, batch, last)
            logits.append(lg)
        # retracted requests come back with their output so far: the prefill continues them
        fresh = [s for s in joiners if s.prefix is None or s.prefix[0].kv is None]
        for s in fresh:
            s.cached -= s.prefix[1] if s.prefix is not None else 0  # its entry was not filled: a full prefill
        if fresh:
            jb, lg = hf_batch.prefill(self.model, [s.req.input_ids + s.output for s in fresh],
                                      self.device, self.pad_id)
            batch = hf_batch.concat(batch, jb)
            rows += fresh
            logits.append(lg)
        for s in joiners:
            if s in fresh:
                continue
            assert s.prefix is not None
            entry, reused = s.prefix
            jb, lg = hf_prefix.prefill_from(self.model, entry, reused, s.req.input_ids + s.output, self.device)
            batch = hf_batch.concat(batch, jb)
            rows.append(s)
            logits.append(lg)
        toks, lps = sample(torch.cat(logits) if len(logits) > 1 else logits[0], [s.sampler for s in rows])
        return batch, rows, toks, lps

    def retract(self) -> None:
        """Drop all KV; unfinished running requests go back to the front of the queue, in order."""
        for s in reversed(self.running):
            if not s.done:
                self.waiting.appendleft(s)
        self.running, self.batch = [], None

    def _emit(self, s: Seq, toks: list[int], lps: list[float | None] | None, version: int,
              reason: FinishReason | None) -> None:
        deliver(s, toks, lps, version, reason)
        if reason is not None and self.seqs.get(s.req.rid) is s:
            del self.seqs[s.req.rid]

    async def _isolate(self, members: list[Seq]) -> None:
        """A step failed on the worker: find the request that caused it and fail only that one.

        The batch goes (its KV may be half-written). Each member is then run alone, as a probe (a
        prefill of its prompt + output so far and a draw from a copy of its RNG; the result is
        dropped). A member whose probe fails is a culprit: its generate() raises EngineError
        ("internal"). The others go back to the front of the queue, in order, and continue (a
        re-prefill, as after a retract; a batch mate's draws in the failed step may have moved a
        sampled row's RNG on). If no probe fails, or every probe of several members does, the
        fault is no one request's: the engine is dead (``_die``)."""
        live = [s for s in members if not s.done]
        self.running, self.batch = [], None
        loop = asyncio.get_running_loop()
        culprits: list[tuple[Seq, BaseException]] = []
        for s in live:
            err = await loop.run_in_executor(self.pool, self._probe, s)
            if err is not None:
                culprits.append((s, err))
        if not culprits or (len(live) > 1 and len(culprits) == len(live)):
            self._die(f"hf engine step failed and no single request explains it ({len(culprits)} of "
                      f"{len(live)} failed alone)")
            return
        for s, err in culprits:
            log.warning("hf request %s failed its step alone: %s: %s", s.req.rid, type(err).__name__, err)
            self._fail_one(s, EngineError(ErrorCode.INTERNAL, f"this request failed in an engine step "
                                                      f"({type(err).__name__}: {err}); its batch mates go on"))
        bad = {id(s) for s, _ in culprits}
        for s in reversed(live):
            if id(s) in bad:
                continue
            if s.abort_requested:
                self._finish(s, "abort")
            else:
                self.waiting.appendleft(s)
        self.isolated += len(culprits)

    @torch.inference_mode()
    def _probe(self, s: Seq) -> BaseException | None:
        """Worker thread: run ``s`` alone (prefill + one draw from a copy of its RNG); its error or None."""
        try:
            if self.faults is not None:
                self.faults.check_rows([(s.req.rid, len(s.output))])
            _, logits = hf_batch.prefill(self.model, [s.req.input_ids + s.output], self.device, self.pad_id)
            sample(logits, [_copy_sampler(s.sampler)])
        except Exception as e:  # the probe's whole point: which request fails alone
            return e
        return None

    def _fail_one(self, s: Seq, err: EngineError) -> None:
        if not s.done:
            s.done = True
            if self.seqs.get(s.req.rid) is s:
                del self.seqs[s.req.rid]
            s.queue.put_nowait(err)

    def _die(self, reason: str) -> None:
        """The engine cannot go on: every request it holds gets EngineError(ENGINE_DEAD) now, new
        ones are refused, and the death callback (the GenerationActor's) is told, once."""
        if self.dead is not None:
            return
        self.dead = reason
        log.error("hf engine dead: %s", reason)
        err = EngineError(ENGINE_DEAD, reason)
        for s in [*self.seqs.values(), *self.running, *self.waiting, *self._launched]:
            self._fail_one(s, err)
        self.seqs.clear()
        self.waiting.clear()
        self.running, self.batch, self._launched = [], None, []
        self.pool.shutdown(wait=False)
        self._wake.set()
        if self.on_death is not None:
            asyncio.get_running_loop().call_soon(self.on_death, reason)

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        if not s.done:
            self._emit(s, [], [] if s.req.return_logprob else None, self.version, reason)


def _copy_sampler(r: RowSampler) -> RowSampler:
    """The same sampler with its own copy of the RNG (a probe must not move the request's draws)."""
    if r.generator is None:
        return r
    g = torch.Generator(device="cpu")
    g.set_state(r.generator.get_state())
    return dataclasses.replace(r, generator=g)
