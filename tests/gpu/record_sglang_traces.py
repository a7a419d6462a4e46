"""Record what the SGLang adapter's compat layer observes from a real SGLang, for the CPU replay test.

For a few requests on the tiny random Qwen2 (greedy streamed with logprobs, sampled non-streamed,
streamed then aborted after three outputs), every output ``TokenizerManager.generate_request``
yields is written down next to the request's ReqState as ``engines/sglang/compat.py`` reads it
(``state_ids``, ``state_logprobs``, ``state_finished``) at that moment. The JSON goes to
``tests/gpu/traces/sglang-<version>.json``; ``tests/engines/test_sglang_traces.py`` replays every
committed trace through the adapter's read path, so a change in those shapes fails on CPU.

On the GPU machine (see ../shared/gpu/README.md for the kit; carry .whl):

    set -o pipefail; export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD
    python3 tests/gpu/record_sglang_traces.py --out "$OUT"     # then commit $OUT/sglang-<version>.json

``--fake`` records the CPU stand-in (tests/gpu/fake_sglang) instead, marked as such in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

PROMPT = [11, 12, 13, 14, 15, 16, 17]
# name, sampling params, stream, return_logprob, abort after this many outputs (0: never)
REQUESTS: list[tuple[str, dict[str, Any], bool, bool, int]] = [
    ("greedy_stream_logprobs", {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}, True, True, 0),
    ("sampled_batch", {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "ignore_eos": True}, False, False, 0),
    ("greedy_stream_eos_on", {"max_new_tokens": 64, "temperature": 0.0}, True, False, 0),
    ("aborted_stream", {"max_new_tokens": 500, "temperature": 0.0, "ignore_eos": True}, True, True, 3),
]


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=repr))


async def record_one(tm: Any, io: Any, name: str, sp: dict[str, Any], stream: bool, logprob: bool,
                     abort_after: int) -> dict[str, Any]:
    from rollwire.engines.sglang import compat

    rid = f"trace-{name}"
    obj = io.GenerateReqInput(input_ids=list(PROMPT), sampling_params=dict(sp), return_logprob=logprob,
                              stream=stream, rid=rid)
    agen = tm.generate_request(obj, None)
    first: Any = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)  # as the adapter: the first step registers the ReqState
    st = compat.req_state(tm, rid)
    observations = []
    try:
        while True:
            try:
                out = await first if first is not None else await agen.__anext__()
            except StopAsyncIteration:
                break
            first = None
            state = None if st is None else {"output_ids": [int(t) for t in compat.state_ids(st)],
                                             "logprobs": [float(v) for v in compat.state_logprobs(st)],
                                             "finished": compat.state_finished(st)}
            observations.append({"output": jsonable(out), "state": state})
            if abort_after and len(observations) == abort_after:
                tm.abort_request(rid)
            if compat.finish_type(compat.output_meta(out))[0] is not None:
                break
    finally:
        await agen.aclose()
    return {"name": name, "sampling_params": sp, "stream": stream, "return_logprob": logprob,
            "aborted_after": abort_after, "prompt": PROMPT, "state_seen": st is not None,
            "observations": observations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "traces"), help="folder for sglang-<version>.json")
    ap.add_argument("--fake", action="store_true", help="record the CPU stand-in (tests/gpu/fake_sglang)")
    args = ap.parse_args()
    if args.fake:
        sys.path.insert(0, str(HERE / "fake_sglang"))
    import sglang
    from common import DIRECT_ENGINE_KWARGS, TINY, TINY_HEAD_STD, TINY_STD, write_qwen2
    from sglang.srt.managers import io_struct

    model = tempfile.mkdtemp(prefix="rw-trace-model-")
    if args.fake:  # the stand-in's tokens depend only on the vocabulary
        from fake_engine import SHAPE
        write_qwen2(model, SHAPE, dtype="bfloat16")
        kwargs: dict[str, Any] = {"skip_tokenizer_init": True}
    else:
        write_qwen2(model, TINY, std=TINY_STD, head_std=TINY_HEAD_STD)
        kwargs = dict(DIRECT_ENGINE_KWARGS)
    eng = sglang.Engine(model_path=model, **kwargs)
    tm = eng.tokenizer_manager

    async def record_all() -> list[dict[str, Any]]:
        tm.auto_create_handle_loop()
        return [await record_one(tm, io_struct, *r) for r in REQUESTS]

    try:
        recorded = eng.loop.run_until_complete(record_all())
    finally:
        eng.shutdown()
    version = str(sglang.__version__)
    trace = {"source": "fake, to be replaced by a GPU recording" if args.fake else "sglang on a GPU",
             "sglang_version": version, "recorder": "tests/gpu/record_sglang_traces.py", "requests": recorded}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sglang-{version}.json"
    path.write_text(json.dumps(trace, indent=1) + "\n")
    print(f"PASS wrote {path} ({len(recorded)} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
