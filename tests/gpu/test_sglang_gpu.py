"""SGLangEngine on a real GPU with the real SGLang: the scripted checks of tests/gpu, as pytest.

Skipped (with the reason) where CUDA or SGLang is missing, which includes CI. On a GPU machine:
``pytest tests/gpu/test_sglang_gpu.py`` (about 8 minutes: four engine starts); run_gpu.sh runs the
same scripts and keeps their logs and JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _skip_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None or "fake_sglang" in str(importlib.util.find_spec("sglang").origin):
        return "sglang is not installed (pip install 'rollwire[sglang]')"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def test_engine_args_from_the_command_line_become_typed_server_args() -> None:
    from rollwire.engines.sglang import convert_engine_args

    got = convert_engine_args({"mem-fraction-static": "0.4", "tp_size": "1", "enable_memory_saver": "true",
                               "attention_backend": "triton", "cuda_graph_max_bs_decode": "32"})
    assert got == {"mem_fraction_static": 0.4, "tp_size": 1, "enable_memory_saver": True,
                   "attention_backend": "triton", "cuda_graph_max_bs_decode": 32}


@pytest.mark.timeout(1200)
def test_every_scripted_check_passes_on_the_gpu(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from common import TINY, TINY_HEAD_STD, TINY_STD, write_qwen2

    model = write_qwen2(str(tmp_path / "tiny"), TINY, std=TINY_STD, head_std=TINY_HEAD_STD)
    env = {**os.environ, "OUT": str(tmp_path)}
    ref = str(tmp_path / "direct_ref.json")
    for script, args in (("direct_sglang.py", [model]), ("adapter_checks.py", [model, ref])):
        subprocess.run([sys.executable, str(HERE / script), *args], env=env, check=True, timeout=900)
        summary = json.loads((tmp_path / script.replace(".py", ".json")).read_text())
        failed = [c for c in summary["checks"] if not c["ok"]]
        assert not failed, failed


@pytest.mark.timeout(900)
def test_end_to_end_serve_trainer_and_worker_processes_on_the_gpu(tmp_path: Path) -> None:
    """tests/gpu/e2e_sglang.py: rollwire serve (colocated) + a trainer process pushing by cuda_ipc +
    a worker process; every check it prints must pass (about 2 minutes)."""
    sys.path.insert(0, str(HERE))
    from common import QWEN05B, write_qwen2

    model = write_qwen2(str(tmp_path / "q05"), QWEN05B)
    subprocess.run([sys.executable, str(HERE / "e2e_sglang.py"), model], env={**os.environ, "OUT": str(tmp_path)},
                   check=True, timeout=800)
    summary = json.loads((tmp_path / "e2e_sglang.json").read_text())
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed and summary["passed"] == 7, failed
