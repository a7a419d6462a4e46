"""Recorded SGLang output traces (tests/gpu/traces/sglang-<version>.json, written by
tests/gpu/record_sglang_traces.py) replayed through the adapter's read path on CPU.

A replaying TokenizerManager registers a ReqState under the request's rid and, for each recorded
output, sets the state to what was recorded at that moment and yields the output. The adapter's
real segment reader (``RequestsMixin._run_segment``, reading through ``engines/sglang/compat.py``)
must turn that into the recorded tokens, logprobs and finish, with exactly one terminal delta. If
SGLang's output dicts or ReqState change shape, recording a new trace makes this test fail here,
without a GPU. Needs no SGLang.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rollwire.engines.base import EngineRequest
from rollwire.engines.sglang import compat
from rollwire.engines.sglang.requests import Live, RequestsMixin
from rollwire.messages.generate import SamplingParams

TRACES = sorted((Path(__file__).parents[1] / "gpu" / "traces").glob("sglang-*.json"))
CASES = [(p, r) for p in TRACES for r in json.loads(p.read_text())["requests"]]


def test_a_trace_of_a_tested_sglang_version_is_committed() -> None:
    versions = [json.loads(p.read_text())["sglang_version"] for p in TRACES]
    assert any(compat.TESTED[0] <= compat.parse_version(v) < compat.TESTED[1] for v in versions), versions


class ReplayTM:
    """The TokenizerManager surface the segment reader uses, replaying one recorded request."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec
        self.rid_to_state: dict[str, Any] = {}
        self.aborted: list[str] = []

    async def generate_request(self, obj: Any, request: Any = None) -> Any:
        st = SimpleNamespace(output_ids=[], output_token_logprobs_val=[], finished=False, out_list=[],
                             event=asyncio.Event())
        if self.rec["state_seen"]:
            self.rid_to_state[obj.rid] = st
        for o in self.rec["observations"]:
            await asyncio.sleep(0)
            if o["state"] is not None:
                st.output_ids[:] = o["state"]["output_ids"]
                st.output_token_logprobs_val[:] = o["state"]["logprobs"]
                st.finished = o["state"]["finished"]
            yield o["output"]
        self.rid_to_state.pop(obj.rid, None)

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)


class Reader(RequestsMixin):
    """Just what RequestsMixin reads of SGLangEngine."""

    def __init__(self, tm: ReplayTM) -> None:
        self._tm = tm
        self._io = SimpleNamespace(GenerateReqInput=lambda **kw: SimpleNamespace(**kw))
        self._version, self._closed, self._dead = 0, False, None
        self.deterministic, self.vocab_size = False, 1 << 20
        self._mask_processor, self._rid_prefix, self._rids = "", "replay-", itertools.count()
        self._session_keys = {}


@pytest.mark.parametrize(("path", "rec"), CASES, ids=[f"{p.stem}:{r['name']}" for p, r in CASES])
async def test_a_recorded_request_reads_back_as_its_tokens_logprobs_and_one_finish(path: Path,
                                                                                  rec: dict[str, Any]) -> None:
    sp = rec["sampling_params"]
    params = SamplingParams(max_new_tokens=sp["max_new_tokens"], temperature=sp["temperature"],
                            ignore_eos=sp.get("ignore_eos", False))
    live = Live(EngineRequest("r", list(rec["prompt"]), params, return_logprob=rec["return_logprob"],
                              stream=rec["stream"]))
    live.abort_requested = bool(rec["aborted_after"])  # the adapter aborted it (SGLang's abort is not an error)
    deltas = [d async for d in Reader(ReplayTM(rec))._run_segment(live)]

    last = rec["observations"][-1]
    kind, _ = compat.finish_type(compat.output_meta(last["output"]))
    assert kind in ("stop", "length", "abort")
    assert [d.finish_reason is not None for d in deltas].count(True) == 1 and deltas[-1].finish_reason == kind
    want = last["state"]["output_ids"] if last["state"] is not None else last["output"]["output_ids"]
    assert [t for d in deltas for t in d.token_ids] == want
    if rec["return_logprob"]:
        lps = [x for d in deltas for x in d.logprobs or []]
        assert len(lps) == len(want) and all(isinstance(x, float) for x in lps)
    for o in rec["observations"]:  # the shapes compat reads
        assert isinstance(o["output"]["meta_info"], dict)
        assert isinstance(compat.cached_tokens(o["output"]["meta_info"]), int)
        if o["state"] is not None and rec["return_logprob"]:
            assert len(o["state"]["logprobs"]) == len(o["state"]["output_ids"])
