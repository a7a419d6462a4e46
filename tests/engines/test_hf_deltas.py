"""How the hf engine hands a request's tokens to its reader: a token per delta for a plain stream,
whole chunks when the reader forwards chunks (``chunk_tokens``), everything at the finish when not
streamed; the tokens and logprobs are the same every way."""

from __future__ import annotations

from rollwire.engines.base import EngineDelta, EngineRequest
from rollwire.engines.hf import HFEngine
from rollwire.messages import SamplingParams


async def deltas(eng: HFEngine, rid: str, *, stream: bool, chunk_tokens: int = 1) -> list[EngineDelta]:
    sp = SamplingParams(max_new_tokens=23, temperature=0.0, ignore_eos=True)
    req = EngineRequest(rid=rid, input_ids=[5, 6, 7, 8], params=sp, return_logprob=True, stream=stream,
                        chunk_tokens=chunk_tokens)
    return [d async for d in eng.generate(req)]


async def test_a_chunked_stream_gets_whole_chunks_and_the_same_tokens_as_every_other_way(tiny_hf: HFEngine) -> None:
    engine = tiny_hf
    per_token = await deltas(engine, "a", stream=True)
    chunked = await deltas(engine, "b", stream=True, chunk_tokens=5)
    whole = await deltas(engine, "c", stream=False)
    assert [len(d.token_ids) for d in per_token] == [1] * 23
    assert [len(d.token_ids) for d in chunked] == [5, 5, 5, 5, 3]  # the last one comes with the finish
    assert [len(d.token_ids) for d in whole] == [23]
    runs = [per_token, chunked, whole]
    tokens = [[t for d in run for t in d.token_ids] for run in runs]
    logprobs = [[x for d in run for x in d.logprobs or []] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 23
    assert logprobs[0] == logprobs[1] == logprobs[2] and len(logprobs[0]) == 23
    assert all(run[-1].finish_reason == "length" and all(d.finish_reason is None for d in run[:-1]) for run in runs)
