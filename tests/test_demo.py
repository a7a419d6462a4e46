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


def test_quick_demo_on_two_servers_goes_on_through_a_server_kill(tmp_path: Path) -> None:
    """`--servers 2`: a fleet of two `rollwire serve` processes; server-1 is SIGKILLed halfway
    (and restarted 3 steps later): every step still trains on fresh groups and the reward rises."""
    out = tmp_path / "fleet-demo"
    proc = subprocess.run([sys.executable, "-m", "rollwire.cli", "--log-level", "error", "demo", "--quick",
                           "--servers", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server-1 SIGKILLed" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight_version"] for r in rows] == list(range(1, 21))  # a push per step, none lost
    assert [r["servers_applied"] for r in rows[:9]] == [2] * 9  # both served before the kill
    assert 1 in [r["servers_applied"] for r in rows[10:]]  # after it, the one left took the versions
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["servers"] == 2 and summary["events"][0] == "server-1 killed"
    assert (out / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_sigterm_stops_the_demo_and_its_processes(tmp_path: Path) -> None:
    """SIGTERM (what CI's timeout and a container stop send) once the first step is out: the demo
    exits 143 and its trainer and workers are gone (before, it died at once and left them running)."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "error", "demo", "--quick",
                             "--plain", "--out", str(tmp_path / "d")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: the demo prints a line per step, and ends
            if line.startswith("step=1 "):
                break
        kids = _children(proc.pid)
        assert len(kids) >= 4  # the trainer and three workers (and multiprocessing's helper)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_running(k) for k in kids):
            assert time.monotonic() < deadline, f"children left running: {kids}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
