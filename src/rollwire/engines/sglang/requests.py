"""One rollwire request inside SGLang: submitting segments, reading outputs, version spans.

A request runs as one or more *segments*: SGLang requests of prompt + output so far with the
remaining token budget. A segment ends when SGLang finishes the request or when the adapter
evicts it (to release memory, to flush, or to make its token count exact at a version switch);
an evicted request is re-submitted once the engine runs again.

Streamed segments (``EngineRequest.stream``) read every new token as SGLang hands it over; one
whose consumer forwards chunks (``chunk_tokens`` > 1) asks SGLang for a per-request
``stream_interval`` of that size, so it costs one wake-up per chunk.
Non-streamed segments are one SGLang request without ``stream``: SGLang sends the output when it
finishes (and every ``SGLANG_FORCE_STREAM_INTERVAL`` tokens to the TokenizerManager, which the
adapter does not wait for), so a request costs one wake-up instead of one per token. Their
weight-version spans stay exact because a version switch evicts every segment not handed over
token by token first (see ``SGLangEngine._prepare_switch``): what SGLang had produced by then is what the
adapter has, tagged with the old version; the rest is generated under the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from rollwire.engines.base import ENGINE_DEAD, EngineDelta, EngineError, EngineRequest
from rollwire.engines.sglang import compat
from rollwire.messages.errors import ErrorCode
from rollwire.messages.generate import FinishReason


@dataclass(eq=False)
class Live:
    req: EngineRequest
    output: list[int] = field(default_factory=list)  # every token delivered so far (all segments)
    logprobs: list[float] = field(default_factory=list)
    marks: list[tuple[int, int]] = field(default_factory=list)  # (tokens produced, version before) per switch
    srid: str = ""  # SGLang rid of the current segment ("" when not inside SGLang)
    state: Any = None  # SGLang's ReqState of the current segment (read through compat)
    seg_base: int = 0  # len(output) when the current segment was submitted
    streamed: bool = True  # the current segment is a streamed SGLang request
    per_token: bool = True  # ... that SGLang hands over at every token (stream_interval 1)
    abort_requested: bool = False
    evicting: bool = False  # aborted inside SGLang to be re-submitted later, not finished
    killed: bool = False  # shutdown stopped waiting for SGLang's answer
    done: bool = False
    cached_reported: bool = False  # cached_tokens went out on the first delta
    pending: asyncio.Future[Any] | None = None  # the segment's next output

    @property
    def submitted(self) -> bool:
        return bool(self.srid)

    def produced(self) -> int:
        """Tokens this request has produced, including outputs SGLang handed over that were not yet read."""
        if self.state is not None:
            return self.seg_base + len(compat.state_ids(self.state))
        return len(self.output)


class RequestsMixin:
    """SGLangEngine's per-request half (the attributes below are SGLangEngine's)."""

    _tm: Any
    _io: Any
    _version: int
    _closed: bool
    _dead: str | None
    deterministic: bool
    vocab_size: int
    _mask_processor: str
    _rid_prefix: str
    _rids: Any
    _session_keys: dict[str, str]
    eos_token_ids: list[int]

    def _sampling_params(self, s: Live) -> dict[str, Any]:
        p = s.req.params
        sp: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens - len(s.output), "temperature": float(p.temperature),
            "top_p": float(p.top_p), "top_k": int(p.top_k), "min_p": float(p.min_p),
            "ignore_eos": bool(p.ignore_eos), "no_stop_trim": True,
        }
        if p.stop_token_ids:
            sp["stop_token_ids"] = [int(t) for t in p.stop_token_ids]
        custom: dict[str, Any] = {}
        if self.deterministic:  # SGLang seeds every row then: unseeded requests get a fresh seed
            sp["sampling_seed"] = int(p.seed) if p.seed is not None else random.getrandbits(62)
            if p.temperature > 0 and p.top_k == -1:
                # SGLang's seeded sampler draws over token ids on its plain path but over sorted ranks
                # once any row of the batch truncates: a top_k that keeps every token puts each row
                # on the sorted path always, so a seed gives the same tokens whatever the batch mates
                sp["top_k"] = self.vocab_size
            if p.min_p > 0 and p.temperature > 0:  # SGLang asserts min_p is not used with a seed
                sp["min_p"] = 0.0
                custom.update(rw_min_p=float(p.min_p), rw_temperature=float(p.temperature))
        if p.allowed_token_ids is not None or p.disallowed_token_ids:
            custom.update(rw_allowed=list(p.allowed_token_ids) if p.allowed_token_ids is not None else None,
                          rw_disallowed=list(p.disallowed_token_ids or []))
        if custom:
            sp["custom_params"] = custom
        return sp

    def _extra_key(self, req: EngineRequest) -> str:
        """SGLang's radix cache only shares prefixes between requests with the same extra_key: one per
        weight version, so a prefix computed by old weights is never reused by a request started
        under new ones, unless a session asked for that (keep_stale_prefix) and still has one."""
        key = f"rw-v{self._version}"
        if req.session_id is None:
            return key
        if req.keep_stale_prefix:
            return self._session_keys.setdefault(req.session_id, key)
        self._session_keys[req.session_id] = key
        return key

    async def _run_segment(self, s: Live) -> AsyncGenerator[EngineDelta, None]:
        """Submit prompt + output so far; read outputs until SGLang ends the request."""
        req = s.req
        sp = self._sampling_params(s)
        # SGLang's ignore_eos also disables stop_token_ids: then the stop ids are watched here, which
        # needs every token as it comes
        local_stops = frozenset(req.params.stop_token_ids) if req.params.ignore_eos else frozenset()
        s.streamed = bool(req.stream or local_stops)
        s.per_token = s.streamed and (bool(local_stops) or req.chunk_tokens <= 1)
        if s.streamed:
            # a consumer that forwards chunks (the fleet's failover streams): SGLang hands the request
            # over at its first token and every chunk_tokens after, one wake-up per chunk instead of
            # per token, and a version switch evicts it like a non-streamed segment. Otherwise 1,
            # whatever the server's own stream_interval: the switch relies on every token being here
            sp["stream_interval"] = 1 if s.per_token else int(req.chunk_tokens)
        s.srid = f"{self._rid_prefix}{next(self._rids):012x}"
        s.seg_base = len(s.output)
        s.evicting = False
        obj = self._io.GenerateReqInput(
            input_ids=list(req.input_ids) + s.output, sampling_params=sp, return_logprob=req.return_logprob,
            stream=s.streamed, rid=s.srid, extra_key=self._extra_key(req),
            custom_logit_processor=self._mask_processor if "custom_params" in sp else None)
        agen = self._tm.generate_request(obj, None)
        try:
            first: asyncio.Future[Any] | None = asyncio.ensure_future(agen.__anext__())
            s.pending = first
            await asyncio.sleep(0)  # its first step registers the ReqState that outputs are read from
            s.state = compat.req_state(self._tm, s.srid)
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
                    raise EngineError(ErrorCode.BAD_SAMPLING_PARAMS, f"sglang: {e}") from None
                first = s.pending = None
                if self._dead is not None:  # SGLang's scheduler died (see SGLangEngine._die)
                    raise EngineError(ENGINE_DEAD, self._dead)
                meta = compat.output_meta(out)
                if s.state is None and out is not None and isinstance(out.get("output_ids"), list):
                    s.state = compat.StateView(out)  # no ReqState seen (should not happen): read the output itself
                kind, fr = compat.finish_type(meta) if out is not None else ("abort", {})
                new_ids, new_lps = self._take_new(s)
                cached = compat.cached_tokens(meta)
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
                    raise EngineError(ErrorCode.INTERNAL, f"sglang: {fr.get('message', fr)}")
                if kind == "abort" and s.evicting and not s.abort_requested and not self._closed:
                    ended = self._finished_within(s, new_ids)
                    if ended is None:
                        for d in self._deltas(s, new_ids, new_lps, None, cached):
                            yield d
                        return  # evicted: generate() re-submits the rest later
                    cut, kind = ended  # the step that took the abort had finished it anyway
                    new_ids = new_ids[:cut]
                    new_lps = new_lps[:cut] if new_lps is not None else None
                reason: FinishReason = "abort" if kind == "abort" else "length" if kind == "length" else "stop"
                for d in self._deltas(s, new_ids, new_lps, reason, cached):
                    yield d
                return
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()

    def _finished_within(self, s: Live, new_ids: list[int]) -> tuple[int, FinishReason] | None:
        """An evicted request's last tokens may include its end: SGLang runs the step in which an
        abort of a running request lands, appends its token, and reports the abort before any EOS,
        stop id or length check. (Where the first of ``new_ids`` that ends it, and how) or None."""
        p = s.req.params
        stops = set() if p.ignore_eos else {*self.eos_token_ids, *(p.stop_token_ids or ())}
        for i, tok in enumerate(new_ids):
            if tok in stops:
                return i + 1, "stop"
            if len(s.output) + i + 1 >= p.max_new_tokens:
                return i + 1, "length"
        return None

    def _take_new(self, s: Live) -> tuple[list[int], list[float] | None]:
        st = s.state
        if st is None:
            return [], [] if s.req.return_logprob else None
        have = len(s.output) - s.seg_base
        ids = [int(t) for t in compat.state_ids(st)[have:]]
        lps: list[float] | None = None
        if s.req.return_logprob:
            lps = [float(x) for x in compat.state_logprobs(st)[have: have + len(ids)]]
        return ids, lps

    def _deltas(self, s: Live, ids: list[int], lps: list[float] | None, reason: FinishReason | None,
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
        first_cached = 0
        if not s.cached_reported and (ids or reason is not None):  # the prompt's cache hits, once
            s.cached_reported = True
            first_cached = cached
        out = []
        for i, (v, a, b) in enumerate(runs):
            last = i == len(runs) - 1
            out.append(EngineDelta(rid=s.req.rid, token_ids=ids[a:b], logprobs=lps[a:b] if lps is not None else None,
                                   weight_version=v, finish_reason=reason if last else None,
                                   cached_tokens=first_cached if i == 0 else 0))
        if reason is not None:
            s.done = True
        return [d for d in out if d.token_ids or d.finish_reason is not None]

    def _version_of(self, s: Live, index: int) -> int:
        for produced, version in s.marks:
            if index < produced:
                return version
        return self._version

    def _final(self, s: Live, reason: FinishReason) -> EngineDelta:
        s.done = True
        return EngineDelta(rid=s.req.rid, token_ids=[], logprobs=[] if s.req.return_logprob else None,
                           weight_version=self._version, finish_reason=reason)
