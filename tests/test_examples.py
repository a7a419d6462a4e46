"""The examples run as a user runs them (a subprocess) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_multiturn_tool_example_prints_one_trajectory_per_session() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "multiturn_tool.py"), "--workers", "2",
                          "--sessions", "3"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = re.findall(r"tokens=(\d+) trained=(\d+) cached_per_turn=\[([\d, ]*)\]", run.stdout)
    assert len(stats) == 6, run.stdout
    for tokens, trained, cached in stats:
        turns = [int(c) for c in cached.split(",")]
        assert 0 < int(trained) < int(tokens)
        assert turns[0] == 0 and all(c > 0 for c in turns[1:])  # later turns reuse the history's KV


def test_openai_agent_example_collects_one_exact_trajectory_per_episode() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_agent.py"), "--workers", "2",
                          "--episodes", "2", "--turns", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = re.findall(r"tokens=(\d+) trained=(\d+) model_turns=(\d+)", run.stdout)
    assert len(stats) == 4, run.stdout
    for tokens, trained, turns in stats:
        assert 0 < int(trained) < int(tokens) and int(turns) == 3
