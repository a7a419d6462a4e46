"""Colocated mode: train_start releases the engine's weights and KV cache, the next version wakes
weights, loads, wakes KV. The freed memory really returns (RSS), and cycles do not grow it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rollwire import RolloutClient, SamplingParams
from rollwire.actors.memory_governor import GOVERNOR
from rollwire.messages import Ack, ControlReply, StepMessage, VersionApplied
from rollwire.runtime import address
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.rpc import RpcClient
from tests.versioned import send_version

from .conftest import free_tcp_endpoint

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def _checkpoint(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ~60 MB Qwen2 checkpoint, so released memory is visible in RSS."""
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp)
    return tmp, {k: v.clone() for k, v in model.state_dict().items()}


async def test_fifty_colocated_cycles_release_and_restore_memory_without_growth(tmp_path: Path) -> None:
    path, state = _checkpoint(tmp_path / "ckpt")
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    ep = free_tcp_endpoint()
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    async with RolloutServer(ServerConfig(model=str(path), rollout_endpoint=ep, mode="colocated")) as srv, \
            RolloutClient(ep, timeout=120) as rc:
        gov: RpcClient = RpcClient(address(GOVERNOR, "weights"), ControlReply)
        reference = await rc.generate([1, 2, 3], sp)
        served, released = [], []
        for cycle in range(1, 51):
            ack = await gov.call(StepMessage(step=cycle, phase="train_start"), timeout=60)
            assert isinstance(ack.msg, Ack)
            assert srv.governor.state.startswith("RELEASED")
            assert srv.generation.engine.info().extra["weights_bytes"] == 0
            released.append(rss_bytes())
            applied = await send_version(cycle, state)
            assert isinstance(applied, VersionApplied), applied
            assert srv.governor.state == "SERVING"
            out = await rc.generate([1, 2, 3], sp)
            assert out.output_ids == reference.output_ids  # type: ignore[union-attr]  # same weights, same output
            assert out.weight_version == cycle  # type: ignore[union-attr]
            served.append(rss_bytes())
        await gov.close()
    freed = [s - r for s, r in zip(served, released, strict=True)]
    # each release gave back (nearly) the weights' bytes, and 50 cycles did not grow the process
    assert min(freed[5:]) > 0.8 * weight_bytes, (freed, weight_bytes)
    assert served[-1] - served[5] < 0.25 * weight_bytes, (served[5], served[-1])
