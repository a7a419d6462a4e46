"""`rollwire demo --quick` as a user (and CI) runs it: trains, writes its files, reward rises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quick_demo_trains_the_tiny_model_and_writes_metrics_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "demo", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reward: first steps" in proc.stdout  # no TTY here: plain lines, then the summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("step", "reward_mean", "weight_version", "tokens_per_s"):
        assert all(key in r for r in rows)
    assert [r["weight_version"] for r in rows] == list(range(1, 21))  # a push per step, each applied
    assert all(r["staleness_max"] <= 1 for r in rows)  # every sample used was within --max-staleness 1
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)  # chance is 1/16 per letter; the policy learns the word
    for image in ("reward.png", "timeline.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
