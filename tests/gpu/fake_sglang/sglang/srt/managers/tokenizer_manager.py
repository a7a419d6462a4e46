"""Fake TokenizerManager + an in-loop fake scheduler (see sglang/__init__.py)."""

import asyncio
import contextlib
import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sglang.srt.managers.io_struct import FlushCacheReqOutput

FORCE_INTERVAL = 8  # SGLang's SGLANG_FORCE_STREAM_INTERVAL (50 there): non-streamed outputs reach the TM this often


@dataclass
class ReqState:
    out_list: list
    finished: bool
    event: asyncio.Event
    obj: Any
    output_ids: list = field(default_factory=list)
    output_token_logprobs_val: list = field(default_factory=list)


class SignalHandler:
    def __init__(self, tm):
        self.tm = tm

    def sigterm_handler(self, signum=None, frame=None):
        self.tm.gracefully_exit = True


@dataclass
class _Req:
    rid: str
    ids: list
    sp: dict
    out: list = field(default_factory=list)
    to_finish: bool = False
    mask: Any = None
    stream: bool = True
    lps: list = field(default_factory=list)
    sent: int = 0
    key: Any = None  # extra_key: the radix cache shares prefixes only under the same key
    cached: int = 0  # tokens handed to the TokenizerManager (non-streamed: every FORCE_INTERVAL, and at the end)


class _ModelConfig:
    def __init__(self, vocab, dtype):
        self.vocab_size = vocab
        self.dtype = dtype


class TokenizerManager:
    def __init__(self, server_args):
        self.server_args = server_args
        cfg = json.loads((Path(server_args.model_path) / "config.json").read_text())
        self.vocab = cfg["vocab_size"]
        dtype = server_args.dtype if server_args.dtype not in (None, "auto") else cfg.get("torch_dtype", "bfloat16")
        self.model_config = _ModelConfig(self.vocab, getattr(torch, str(dtype)))
        self.context_len = server_args.context_length or cfg.get("max_position_embeddings", 4096)
        self.rid_to_state = {}
        self.asyncio_tasks = set()
        self.event_loop = None
        self.is_pause = False
        self.is_pause_cond = asyncio.Condition()
        self.signal_handler_class = SignalHandler
        self.scheduler_dead = False
        self.crash = None
        # scheduler side
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._waiting, self._running = [], []
        self._paused = ""
        self._salt = 0
        self._offloaded = set()
        self._groups = set()
        self._radix: dict = {}  # extra_key -> token sequences computed under it (a stand-in prefix cache)
        self.fake_nccl_hang = False  # update_weights_from_distributed never completes (a dead trainer)
        self.fake_fail_weight_calls: set[int] = set()  # these update_weights_from_tensor calls (1, 2, ...) fail
        self.fake_raise_weight_calls: set[int] = set()  # ... raise instead (a crash mid-load, not a refusal)
        self._weight_calls = 0
        self.log = []
        self.fake_rounds = 0  # scheduler loop iterations so far: tests wait on these, not on wall time

    # -- tokenizer manager side -----------------------------------------------------------------
    async def freeze_gc(self):
        self.gc_frozen = True

    def auto_create_handle_loop(self):
        if self.event_loop is not None:
            return
        self.event_loop = asyncio.get_running_loop()
        self.asyncio_tasks.add(self.event_loop.create_task(self._scheduler()))

    async def generate_request(self, obj, request=None):
        self.auto_create_handle_loop()
        if obj.rid in self.rid_to_state:
            raise ValueError(f"Duplicate request ID detected: {obj.rid}")
        state = ReqState([], False, asyncio.Event(), obj)
        self.rid_to_state[obj.rid] = state
        async with self.is_pause_cond:
            await self.is_pause_cond.wait_for(lambda: not self.is_pause)
        self._send(("req", obj))
        while True:
            await state.event.wait()
            out_list, state.out_list = state.out_list, []
            state.event.clear()
            yield out_list[-1]
            if state.finished:
                break

    def _send(self, msg):
        if not self.scheduler_dead:
            self._inbox.put_nowait(msg)

    def abort_request(self, rid="", abort_all=False):
        if not abort_all and not rid:
            return
        if not abort_all and rid not in self.rid_to_state:
            return
        self._send(("abort", rid, abort_all))

    async def _call(self, *msg):
        fut = asyncio.get_running_loop().create_future()
        self._send((*msg, fut))
        return await fut

    async def pause_generation(self, obj):
        async with self.is_pause_cond:
            self.is_pause = True
            if obj.mode != "abort":
                self._send(("pause", obj.mode))
            else:
                self.abort_request(abort_all=True)
                await asyncio.sleep(1.0)

    async def continue_generation(self, obj):
        async with self.is_pause_cond:
            self.is_pause = False
            self._send(("continue",))
            self.is_pause_cond.notify_all()

    async def get_internal_state(self):
        return await self._call("state")

    async def update_weights_from_tensor(self, obj, request=None):
        if obj.abort_all_requests:
            self.abort_request(abort_all=True)
        assert self.is_pause or not self.rid_to_state, \
            "fake: the adapter loads while the scheduler is paused or runs none of its requests"
        self._weight_calls += 1
        if self._weight_calls in self.fake_fail_weight_calls:  # after the earlier buckets were loaded
            return False, f"fake: injected failure of weight load call {self._weight_calls}"
        if self._weight_calls in self.fake_raise_weight_calls:
            raise RuntimeError(f"fake: injected crash in weight load call {self._weight_calls}")
        ok, msg = await self._call("weights", obj)
        if ok and obj.weight_version is not None:
            self.server_args.weight_version = obj.weight_version
        return ok, msg

    async def release_memory_occupation(self, obj, request=None):
        return await self._call("release", obj.tags)

    async def resume_memory_occupation(self, obj, request=None):
        return await self._call("resume", obj.tags)

    async def flush_cache(self):
        return await self._call("flush")

    async def init_weights_update_group(self, obj, request=None):
        self._groups.add(obj.group_name)
        return True, "Succeeded to initialize custom process group."

    async def destroy_weights_update_group(self, obj, request=None):
        if obj.group_name not in self._groups:
            return False, "The group to be destroyed does not exist."
        self._groups.discard(obj.group_name)
        return True, "Succeeded to destroy custom process group."

    async def update_weights_from_distributed(self, obj, request=None):
        assert obj.group_name in self._groups, "Please call `init_weights_update_group` first."
        assert self.is_pause or not self.rid_to_state, \
            "fake: the adapter loads while the scheduler is paused or runs none of its requests"
        if self.fake_nccl_hang:
            await asyncio.sleep(3600)
        ok, msg = await self._call("nccl", obj)
        if ok and obj.weight_version is not None:
            self.server_args.weight_version = obj.weight_version
        return ok, msg

    def _handle_output(self, rid, new, lps, finish, cached=0):
        state = self.rid_to_state.get(rid)
        if state is None:
            return
        state.output_ids.extend(new)
        state.output_token_logprobs_val.extend(lps)
        meta = {"id": rid, "finish_reason": finish, "weight_version": self.server_args.weight_version,
                "cached_tokens": cached}
        state.finished = finish is not None
        if not getattr(state.obj, "stream", False) and finish is None:
            return  # as SGLang: a non-streamed request's state grows, its caller hears only the finish
        state.out_list.append({"output_ids": state.output_ids if finish is None else list(state.output_ids),
                               "meta_info": meta})
        state.event.set()
        if finish is not None:
            del self.rid_to_state[rid]

    def _handle_abort_req(self, rid):
        state = self.rid_to_state.get(rid)
        if state is None:
            return
        state.finished = True
        ids = state.output_ids
        reason = {"type": "abort", "message": "Abort in waiting queue"}
        state.out_list.append({"output_ids": [ids[-1]] if ids else [],  # as SGLang: the last token only
                               "meta_info": {"id": rid, "finish_reason": reason, "completion_tokens": len(ids)}})
        state.event.set()
        del self.rid_to_state[rid]

    # -- scheduler side ---------------------------------------------------------------------------
    def _idle(self):
        return not self._waiting and not self._running

    async def _scheduler(self):
        step = self.server_args.fake_step_s
        while not self.scheduler_dead:
            self.fake_rounds += 1
            msgs = []
            with contextlib.suppress(asyncio.TimeoutError):
                msgs.append(await asyncio.wait_for(self._inbox.get(), step))
            while not self._inbox.empty():
                msgs.append(self._inbox.get_nowait())
            for m in msgs:
                self._process(m)
            if self._paused or self._offloaded or self.crash:
                continue
            if self._waiting or self._running:
                await asyncio.sleep(step)  # the forward pass
                self._step()

    def _process(self, m):
        kind = m[0]
        fut = m[-1] if isinstance(m[-1], asyncio.Future) else None
        try:
            if kind == "req":
                obj = m[1]
                ids = list(obj.input_ids)
                self.log.append(("req", obj.rid, obj.extra_key))
                hit = max((_common(ids, seq) for seq in self._radix.get(obj.extra_key, ())), default=0)
                self._waiting.append(_Req(obj.rid, ids, dict(obj.sampling_params or {}), stream=bool(obj.stream),
                                          key=obj.extra_key, cached=min(hit, len(ids) - 1)))
            elif kind == "abort":
                _, rid, all_ = m
                for r in list(self._waiting):
                    if all_ or r.rid.startswith(rid):
                        self._waiting.remove(r)
                        self._out(self._handle_abort_req, r.rid)
                for r in self._running:
                    if all_ or r.rid.startswith(rid):
                        r.to_finish = True
            elif kind == "pause":
                self._paused = m[1]
                if m[1] == "retract":
                    self._waiting[:0] = self._running
                    self._running = []
            elif kind == "continue":
                self._paused = ""
            elif kind == "state":  # as SGLang: one dict per DP rank, with the limit it computed from memory
                limit = self.server_args.max_running_requests or 4096
                self._reply(fut, [{"effective_max_running_requests_per_dp": limit}])
            elif kind == "nccl":
                obj = m[1]
                self._salt = hash((tuple(obj.names), obj.weight_version)) % 100003
                if obj.flush_cache:
                    assert self._idle(), "Cache flush failed after updating weights"
                self._reply(fut, (True, "Succeeded to update parameter online."))
            elif kind == "weights":
                obj = m[1]
                named = pickle.loads(obj.serialized_named_tensors[0])
                self._salt = hash(tuple(round(float(t.float().sum()), 3) for _, t in named)) % 100003
                if obj.flush_cache:
                    assert self._idle(), "Cache flush failed after updating weights"
                    self._radix.clear()
                self._reply(fut, (True, "Success"))
            elif kind == "release":
                assert self._idle(), "release_memory_occupation should be called only when server is idle."
                self._offloaded.update(m[1] or ["weights", "kv_cache", "cuda_graph"])
                self._reply(fut, None)
            elif kind == "resume":
                self._offloaded.difference_update(m[1] or ["weights", "kv_cache", "cuda_graph"])
                self._reply(fut, None)
            elif kind == "flush":
                if self._idle():
                    self._radix.clear()
                self._reply(fut, FlushCacheReqOutput(success=self._idle()))
        except AssertionError as e:  # the real scheduler process dies here
            self.crash = e
            self.log.append(f"CRASH {e}")
            print(f"FAKE SCHEDULER CRASH: {e} waiting={[r.rid for r in self._waiting]} "
                  f"running={[r.rid for r in self._running]}", flush=True)
            if fut is not None and not fut.done():
                fut.set_exception(e)

    def _reply(self, fut, value):
        # control replies and token outputs travel on different sockets; model a small delay
        asyncio.get_running_loop().call_later(0.0005, lambda: fut.done() or fut.set_result(value))

    def _out(self, fn, *args):
        asyncio.get_running_loop().call_soon(fn, *args)

    def _token(self, r):
        sp = r.sp
        h = hash((self._salt, tuple(r.ids + r.out)[-6:], len(r.ids) + len(r.out)))
        if sp.get("temperature", 1.0) > 0 and sp.get("top_k", -1) != 1:
            h ^= random.getrandbits(30)
        tok = h % self.vocab
        cp = sp.get("custom_params") or {}
        if cp.get("rw_allowed") is not None:
            tok = cp["rw_allowed"][h % len(cp["rw_allowed"])]
        banned = set(cp.get("rw_disallowed") or [])
        while tok in banned:
            tok = (tok + 1) % self.vocab
        return tok, -float(h % 97) / 10

    def _step(self):
        self._running += self._waiting
        self._waiting = []
        keep = []
        for r in self._running:
            if r.to_finish:  # as SGLang: the step runs, its token is appended, then the abort applies
                tok, lp = self._token(r)
                r.out.append(tok)
                r.lps.append(lp)
                self._out(self._handle_output, r.rid, r.out[r.sent:], r.lps[r.sent:], {"type": "abort"})
                continue
            tok, lp = self._token(r)
            r.out.append(tok)
            sp = r.sp
            fin = None
            if not sp.get("ignore_eos") and (tok in (sp.get("stop_token_ids") or []) or tok == 2):  # as SGLang
                fin = {"type": "stop", "matched": tok}
            elif len(r.out) >= sp.get("max_new_tokens", 128):
                fin = {"type": "length", "length": len(r.out)}
            r.lps.append(lp)
            every = int(sp.get("stream_interval") or 1)  # as SGLang: the first token, then every `every`
            streamed_now = r.stream and (len(r.out) % every == 1 if every > 1 else True)
            if streamed_now or fin is not None or (not r.stream and len(r.out) % FORCE_INTERVAL == 0):
                self._out(self._handle_output, r.rid, r.out[r.sent:], r.lps[r.sent:], fin, r.cached)
                r.sent = len(r.out)
            if fin is not None:
                self._radix.setdefault(r.key, []).append(r.ids + r.out)
            if fin is None:
                keep.append(r)
        self._running = keep


def _common(a, b):
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
