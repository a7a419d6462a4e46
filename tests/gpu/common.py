"""Shared by the GPU scripts: random-weight Qwen2 checkpoints written locally, engine arguments that
work with the trimmed SGLang wheels (../shared/gpu/README.md), prompts, JSON output."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

# As `--engine-arg key=value` would give them: strings (the adapter converts them).
KIT_ENGINE_ARGS: dict[str, str] = {
    "attention_backend": "triton", "sampling_backend": "pytorch", "mem_fraction_static": "0.3",
    "cuda_graph_max_bs_decode": "32", "log_level": "warning", "random_seed": "0",
}
# The same for sglang.Engine called directly (what SGLangEngine adds: token ids in/out, masks).
DIRECT_ENGINE_KWARGS: dict[str, Any] = {
    "attention_backend": "triton", "sampling_backend": "pytorch", "mem_fraction_static": 0.3,
    "cuda_graph_max_bs_decode": 32, "log_level": "warning", "random_seed": 0, "enable_memory_saver": True,
    "skip_tokenizer_init": True, "enable_custom_logit_processor": True,
}
# The correctness checks compare token for token across engines and weight reloads: without the
# prefix cache every run takes the same kernel path (a cached prefix and a recomputed one differ in
# the last bits, which flips bf16 argmax near-ties).
CHECK_ENGINE_ARGS: dict[str, str] = {**KIT_ENGINE_ARGS, "disable_radix_cache": "true"}
CHECK_DIRECT_KWARGS: dict[str, Any] = {**DIRECT_ENGINE_KWARGS, "disable_radix_cache": True}

# hidden 256, 4 layers, vocab 32000 (the kit's smoke model). Layers at std 0.02 (well conditioned in
# bf16; wider layers made the residual stream large and greedy outputs chaotic), lm_head at 0.25 so
# logits have std ~4 and greedy picks clear margins.
TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
TINY_STD, TINY_HEAD_STD = 0.02, 0.25
# Qwen2-0.5B's shape (494 M parameters)
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
               tie_word_embeddings=True, rope_theta=1000000.0)


def write_qwen2(out: str, shape: dict[str, Any], *, seed: int = 0, std: float = 0.02, head_std: float | None = None,
                dtype: str = "bfloat16") -> str:
    """A random-weight Qwen2ForCausalLM checkpoint (config.json, generation_config.json,
    model.safetensors) written without running transformers' init. Norms are ones, biases zeros."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.torch_dtype = dtype
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(path))
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(path))
    if (path / "model.safetensors").exists():
        return out
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    state = {}
    for name, p in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if "norm" in name:
            t = torch.ones(p.shape)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape)
        else:
            s = head_std if (head_std is not None and name == "lm_head.weight") else std
            t = torch.randn(p.shape, generator=gen) * s
        state[name] = t.to(tdtype).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return out


def prompts(n: int, vocab: int, seed: int = 1234, lo: int = 3, hi: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def out_dir() -> Path:
    d = Path(os.environ.get("OUT") or os.environ.get("RW_OUT") or "/tmp/rw-gpu-out")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Report:
    """PASS/FAIL lines with times, and a JSON summary of every check and figure."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.time()
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def check(self, name: str, ok: bool, **info: Any) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), **info})
        detail = " ".join(f"{k}={v}" for k, v in info.items())
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}"[:2000], flush=True)
        return bool(ok)

    def fail(self, name: str, e: BaseException) -> None:
        import traceback

        traceback.print_exc()
        self.check(name, False, error=f"{type(e).__name__}: {e}")

    def figure(self, key: str, value: Any) -> None:
        self.figures[key] = value
        print(f"FIGURE {key} = {value}", flush=True)

    def write(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        summary = {"script": self.name, "seconds": round(time.time() - self.t0, 1),
                   "passed": sum(c["ok"] for c in self.checks), "failed": sum(not c["ok"] for c in self.checks),
                   "checks": self.checks, "figures": self.figures, **(extra or {})}
        (out_dir() / f"{self.name}.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"SUMMARY {self.name}: {summary['passed']} passed, {summary['failed']} failed, "
              f"{summary['seconds']}s", flush=True)
        return summary


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import sglang

        info["sglang"] = sglang.__version__
    except ImportError:
        pass
    return info


def gib_free() -> float:
    import torch

    return torch.cuda.mem_get_info(0)[0] / 2**30


async def wait_serving(rc: Any, proc: Any, timeout: float = 300.0) -> None:
    """Until `rollwire serve` (child process ``proc``) answers a status request on client ``rc``;
    raises if the process exits first."""
    import asyncio

    async with asyncio.timeout(timeout):
        while True:
            try:
                await rc.status(timeout=2.0)
                return
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError(f"rollwire serve exited with {proc.returncode}") from None
                await asyncio.sleep(1.0)


def stop_process(proc: Any, timeout: float = 60.0) -> None:
    """SIGTERM (serve stops cleanly), then SIGKILL after ``timeout``."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
