"""sglang.Engine called directly (no rollwire): smoke checks, per-tag release/resume figures, and the
greedy reference outputs the adapter and end-to-end checks compare against.

    python tests/gpu/direct_sglang.py MODEL_DIR      # writes $OUT/direct_sglang.json and $OUT/direct_ref.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import CHECK_DIRECT_KWARGS, Report, device_info, gib_free, out_dir, prompts

MAX_NEW = 32


def main(model: str) -> int:
    import sglang
    import torch
    from safetensors.torch import load_file
    from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

    rep = Report("direct_sglang")
    t = time.time()
    eng = sglang.Engine(model_path=model, **CHECK_DIRECT_KWARGS)
    rep.figure("engine_start_s", round(time.time() - t, 1))
    vocab = json.loads(Path(f"{model}/config.json").read_text())["vocab_size"]
    ps = prompts(8, vocab)
    greedy = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
    run = eng.loop.run_until_complete

    def alone() -> tuple[list[list[int]], list[list[float]]]:
        outs = [eng.generate(input_ids=p, sampling_params=greedy, return_logprob=True) for p in ps]
        return ([o["output_ids"] for o in outs],
                [[x[0] for x in o["meta_info"]["output_token_logprobs"]] for o in outs])

    alone()  # warm (the first greedy output on random weights can differ from later ones)
    ref, ref_lp = alone()
    again, _ = alone()
    rep.check("greedy alone is repeatable", again == ref, same=sum(a == b for a, b in zip(again, ref, strict=True)))
    batched = [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=greedy)]
    rep.check("greedy batched equals alone", batched == ref,
              same=sum(a == b for a, b in zip(batched, ref, strict=True)), of=len(ps))

    async def stream() -> int:
        n = 0
        async for _ in await eng.async_generate(input_ids=ps[0], sampling_params=greedy, stream=True):
            n += 1
        return n
    rep.check("async_generate stream=True", run(stream()) >= 2)

    sd = load_file(f"{model}/model.safetensors")
    cpu = list(sd.items())
    cuda = [(k, v.cuda()) for k, v in cpu]
    perturbed = [(k, v * 1.5 + 0.01) for k, v in cuda]

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rep.figure("update_all_cuda_s", round(timed(lambda: eng.update_weights_from_tensor(named_tensors=perturbed)), 4))
    changed = [o["output_ids"] for o in eng.generate(input_ids=ps[:4], sampling_params=greedy)]
    rep.check("perturbed weights change output", changed != ref[:4])
    rep.figure("update_all_cpu_s", round(timed(lambda: eng.update_weights_from_tensor(named_tensors=cpu)), 4))
    rep.check("originals (CPU tensors) restore output", alone()[0] == ref)
    rep.figure("update_all_cuda_restore_s", round(timed(lambda: eng.update_weights_from_tensor(named_tensors=cuda)), 4))
    rep.check("originals (CUDA tensors) restore output", alone()[0] == ref)
    rep.figure("checkpoint_bytes", sum(v.numel() * v.element_size() for _, v in cpu))

    tags_fig = {}
    for tags in (["kv_cache"], ["weights"], ["cuda_graph"], None):
        f0 = gib_free()
        t_rel = timed(lambda tags=tags: eng.release_memory_occupation(tags=tags))
        f1 = gib_free()
        t_res = timed(lambda tags=tags: eng.resume_memory_occupation(tags=tags))
        f2 = gib_free()
        if tags is None or "weights" in tags:
            eng.update_weights_from_tensor(named_tensors=cuda)
        tags_fig[",".join(tags or ["all"])] = {"release_s": round(t_rel, 4), "resume_s": round(t_res, 4),
                                               "freed_gib": round(f1 - f0, 3), "taken_back_gib": round(f1 - f2, 3)}
    rep.figure("release_resume_by_tag", tags_fig)
    rep.check("release/resume(all) + re-send weights restores output", alone()[0] == ref)

    for mode in ("abort", "retract", "in_place"):
        async def cycle(mode: str = mode) -> tuple[list[str], float]:
            sp = {"max_new_tokens": 256, "ignore_eos": True}
            tasks = [asyncio.ensure_future(eng.async_generate(input_ids=[5, 6, i], sampling_params=sp))
                     for i in range(8)]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            await eng.tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=mode))
            paused = time.perf_counter() - t0
            await asyncio.sleep(0.1)
            await eng.tokenizer_manager.continue_generation(ContinueGenerationReqInput())
            outs = await asyncio.gather(*tasks)
            return [o["meta_info"]["finish_reason"]["type"] for o in outs], paused
        fins, paused = run(cycle())
        want = "abort" if mode == "abort" else "length"
        rep.check(f"direct pause_generation({mode}) with 8 in flight", all(f == want for f in fins),
                  finish=fins, pause_call_s=round(paused, 3))

    (out_dir() / "direct_ref.json").write_text(json.dumps({"prompts": ps, "max_new_tokens": MAX_NEW,
                                                           "greedy": ref, "logprobs": ref_lp}))
    eng.shutdown()
    rep.write({"device": device_info(), "model": model,
               "torch_cuda_free_gib_end": round(torch.cuda.mem_get_info(0)[0] / 2**30, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
