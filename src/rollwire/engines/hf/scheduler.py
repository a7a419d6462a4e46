"""HFEngine's scheduling half: the task that admits requests and runs steps back to back, one step
on the worker thread (decode the running rows, prefill the joiners, sample), the booking of each
step's tokens and the hand-out of deltas (see ``engine``'s module docstring; the attributes below are
HFEngine's)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rollwire.engines.base import ENGINE_DEAD, EngineError
from rollwire.engines.hf import batch as hf_batch
from rollwire.engines.hf import prefix as hf_prefix
from rollwire.engines.hf.faults import Faults
from rollwire.engines.hf.requests import FairQueue, Seq, deliver
from rollwire.engines.hf.sampling import RowSampler, sample
from rollwire.engines.hf.weights import WeightStore
from rollwire.messages.generate import FinishReason

log = logging.getLogger("rollwire.engines.hf")


class StepLoop:
    MAX_PREFILL_TOKENS: int
    model: Any
    max_batch_size: int
    device: torch.device
    pad_id: int
    _weights: WeightStore
    _version: int
    _prefixes: hf_prefix.PrefixCache
    _seqs: dict[str, Seq]
    _waiting: FairQueue
    _running: list[Seq]
    _batch: hf_batch.Batch | None
    _paused: bool
    _stepping: bool
    _launched: list[Seq]
    _closed: bool
    _lock: asyncio.Lock
    _wake: asyncio.Event
    _pool: ThreadPoolExecutor
    _dead: str | None
    _on_death: Callable[[str], None] | None
    _faults: Faults | None
    _isolated: int  # requests failed alone after a step failed
    _preempted: int  # rows that gave up their batch slot to a client below its share

    def _can_step(self) -> bool:
        # restored-but-unloaded weights are garbage: never step on them (a complete load clears it)
        return not (self._paused or self._weights.released or self._weights.undefined or self._closed
                    or self._dead is not None) and bool(
            self._waiting or any(not s.done for s in self._running))

    async def _schedule(self) -> None:
        while not self._closed and self._dead is None:
            await self._wake.wait()
            self._wake.clear()
            while self._can_step():
                async with self._lock:
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
        for i, s in enumerate(self._running):
            if s.abort_requested and not s.done:
                self._finish(s, "abort")
            if not s.done:
                keep.append(i)
        keep = self._fair_share(keep)
        joiners: list[Seq] = []
        longest = 0  # joiners are padded to the longest: bound the padded prefill of one step
        while self._waiting and len(keep) + len(joiners) < self.max_batch_size:
            s = self._waiting.peek()
            n = len(s.req.input_ids) + len(s.output)
            if joiners and (len(joiners) + 1) * max(longest, n) > self.MAX_PREFILL_TOKENS:
                break
            longest = max(longest, n)
            joiners.append(self._waiting.popleft())
            self._admit(s)
        members = [*(self._running[i] for i in keep), *joiners]
        if not members:
            self._running, self._batch = [], None
            self._stepping = False
            return None
        self._stepping = True
        self._launched = members
        if self._faults is not None and self._faults.worker_dies_now():  # test hook: the worker dies
            self._pool.shutdown(wait=False)
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, self._compute, self._batch, keep, members[:len(keep)], joiners)
        return fut, self._version, members

    def _fair_share(self, keep: list[int]) -> list[int]:
        """A full batch makes room for a client that waits with fewer rows than its share
        (``max_batch_size`` // clients with work): the client holding the most rows above its share
        gives up its newest one, which goes first in its own queue (re-prefilled when admitted
        again, as after a retract: its tokens so far are kept), and the waiting client takes the
        next turn. One row per waiting client per step."""
        waiting = self._waiting.clients() if len(keep) >= self.max_batch_size else []
        if not waiting:
            return keep
        held = collections.Counter(self._running[i].req.client for i in keep)
        share = max(1, self.max_batch_size // len(set(held) | set(waiting)))
        for client in waiting:
            if held[client] >= share:
                continue
            top, rows = held.most_common(1)[0]
            if rows <= share:
                break
            idx = next(i for i in reversed(keep) if self._running[i].req.client == top)
            keep.remove(idx)
            held[top] -= 1
            held[client] += 1
            self._waiting.put_back(self._running[idx])
            self._waiting.next_turn(client)
            self._preempted += 1
        return keep

    def _admit(self, s: Seq) -> None:
        """A joiner of the next step: find its session's cached prefix (KV computed now is of
        the live version). ``cached`` adds up over the prefills of a retracted request, as SGLang
        counts its ``cached_tokens``."""
        s.kv_version, s.prefix = self._version, None
        if s.req.session_id is not None:
            s.prefix = self._prefixes.lookup(s.req.session_id, s.req.input_ids + s.output, self._version,
                                             s.req.keep_stale_prefix)
            s.cached += s.prefix[1] if s.prefix is not None else 0
            if s.prefix is not None and s.prefix[0].version != self._version:
                s.kv_version = hf_prefix.STALE  # reused an older version's KV (keep_stale_prefix)

    def _keep_prefix(self, batch: hf_batch.Batch, row: int, s: Seq) -> None:
        """Keep a finished session request's KV for the session's next turn. The copy is queued
        on the worker ahead of any later step, so a step that uses the entry finds it filled."""
        assert s.req.session_id is not None
        tokens = s.req.input_ids + s.output[:-1]
        entry = hf_prefix.Entry(tokens=tokens, version=s.kv_version,
                                nbytes=len(tokens) * hf_prefix.bytes_per_token(batch))
        self._prefixes.put(s.req.session_id, entry)
        self._pool.submit(hf_prefix.fill, entry, batch, row)
        self._prefixes.evict_to_budget()

    def _book(self, batch: hf_batch.Batch | None, rows: list[Seq], toks: list[int]) -> list[FinishReason | None]:
        """Record a step's tokens and decide who finished (their rids are free from here on)."""
        self._batch, self._running = batch, rows
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
                if self._seqs.get(s.req.rid) is s:
                    del self._seqs[s.req.rid]
                if s.req.session_id is not None and reason != "abort" and batch is not None:
                    self._keep_prefix(batch, i, s)
            reasons.append(reason)
        if all(s.done for s in rows):  # free the KV now rather than at the next step
            self._batch, self._running = None, []
        return reasons

    @torch.inference_mode()
    def _compute(self, batch: hf_batch.Batch | None, keep: list[int], rows: list[Seq], joiners: list[Seq],
                 ) -> tuple[hf_batch.Batch | None, list[Seq], list[int], list[float | None]]:
        """Worker thread: one decode of rows ``keep`` of ``batch`` (requests ``rows``) plus one
        prefill of the joiners; returns the new batch, its requests, their tokens and logprobs."""
        if self._faults is not None:
            self._faults.check_rows((s.req.rid, len(s.output)) for s in [*rows, *joiners])
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

    def _retract(self) -> None:
        """Drop all KV; unfinished running requests go back to the front of the queue, in order."""
        for s in reversed(self._running):
            if not s.done:
                self._waiting.appendleft(s)
        self._running, self._batch = [], None

    def _emit(self, s: Seq, toks: list[int], lps: list[float | None] | None, version: int,
              reason: FinishReason | None) -> None:
        deliver(s, toks, lps, version, reason)
        if reason is not None and self._seqs.get(s.req.rid) is s:
            del self._seqs[s.req.rid]

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
        self._running, self._batch = [], None
        loop = asyncio.get_running_loop()
        culprits: list[tuple[Seq, BaseException]] = []
        for s in live:
            err = await loop.run_in_executor(self._pool, self._probe, s)
            if err is not None:
                culprits.append((s, err))
        if not culprits or (len(live) > 1 and len(culprits) == len(live)):
            self._die(f"hf engine step failed and no single request explains it ({len(culprits)} of "
                      f"{len(live)} failed alone)")
            return
        for s, err in culprits:
            log.warning("hf request %s failed its step alone: %s: %s", s.req.rid, type(err).__name__, err)
            self._fail_one(s, EngineError("internal", f"this request failed in an engine step "
                                                      f"({type(err).__name__}: {err}); its batch mates go on"))
        bad = {id(s) for s, _ in culprits}
        for s in reversed(live):
            if id(s) in bad:
                continue
            if s.abort_requested:
                self._finish(s, "abort")
            else:
                self._waiting.appendleft(s)
        self._isolated += len(culprits)

    @torch.inference_mode()
    def _probe(self, s: Seq) -> BaseException | None:
        """Worker thread: run ``s`` alone (prefill + one draw from a copy of its RNG); its error or None."""
        try:
            if self._faults is not None:
                self._faults.check_rows([(s.req.rid, len(s.output))])
            _, logits = hf_batch.prefill(self.model, [s.req.input_ids + s.output], self.device, self.pad_id)
            sample(logits, [_copy_sampler(s.sampler)])
        except Exception as e:  # the probe's whole point: which request fails alone
            return e
        return None

    def _fail_one(self, s: Seq, err: EngineError) -> None:
        if not s.done:
            s.done = True
            if self._seqs.get(s.req.rid) is s:
                del self._seqs[s.req.rid]
            s.queue.put_nowait(err)

    def _die(self, reason: str) -> None:
        """The engine cannot go on: every request it holds gets EngineError(ENGINE_DEAD) now, new
        ones are refused, and the death callback (the GenerationActor's) is told, once."""
        if self._dead is not None:
            return
        self._dead = reason
        log.error("hf engine dead: %s", reason)
        err = EngineError(ENGINE_DEAD, reason)
        for s in [*self._seqs.values(), *self._running, *self._waiting, *self._launched]:
            self._fail_one(s, err)
        self._seqs.clear()
        self._waiting.clear()
        self._running, self._batch, self._launched = [], None, []
        self._pool.shutdown(wait=False)
        self._wake.set()
        if self._on_death is not None:
            asyncio.get_running_loop().call_soon(self._on_death, reason)

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        if not s.done:
            self._emit(s, [], [] if s.req.return_logprob else None, self._version, reason)


def _copy_sampler(r: RowSampler) -> RowSampler:
    """The same sampler with its own copy of the RNG (a probe must not move the request's draws)."""
    if r.generator is None:
        return r
    g = torch.Generator(device="cpu")
    g.set_state(r.generator.get_state())
    return dataclasses.replace(r, generator=g)
