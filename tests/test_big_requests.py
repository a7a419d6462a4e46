"""A prompt far above the context length, with many samples, against a real `rollwire serve`
process: refused ``too_long`` without being copied once per sample (an adversarial try found each
of the n samples copying the prompt before the check: ~490 MB per sample for a 57 MiB request, a
server OOM at n=64), while a bystander's request runs to its end."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from rollwire import RolloutClient, SamplingParams
from rollwire.messages import ErrorCode, RollwireError

from .conftest import free_tcp_endpoint, kill_all, until


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_a_huge_prompt_with_many_samples_is_refused_without_a_copy_per_sample() -> None:
    ep = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", ep], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with RolloutClient(ep, timeout=120) as rc:
            await rc.wait_ready(timeout=120)
            bystander = asyncio.ensure_future(rc.generate(
                [4, 5, 6], SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)))
            await until(lambda: _running(rc), "the bystander is generating")
            before = _peak_rss_mb(proc.pid)
            prompt = [1] * 2_000_000  # 16 MB as a Python list: 1 GB if copied for each of 64 samples
            with pytest.raises(RollwireError) as err:
                await rc.generate(prompt, SamplingParams(max_new_tokens=4, n=64))
            assert err.value.code == ErrorCode.TOO_LONG, err.value
            grew = _peak_rss_mb(proc.pid) - before
            assert grew < 300, f"the server's peak memory grew {grew:.0f} MB for one refused request"
            out = await asyncio.wait_for(bystander, 120)  # (a hang guard) it ran to its end
            assert out.finish_reason == "length" and len(out.output_ids) == 64
    finally:
        kill_all([proc])


async def _running(rc: RolloutClient) -> bool:
    return (await rc.status()).counters.get("samples_in_flight", 0) == 1
