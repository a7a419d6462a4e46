"""Issue 14, "the engine dying", on a GPU: SGLang's scheduler process is killed under load.

`rollwire serve --engine sglang` runs as a child process; this process is its rollout client with
16 long requests running inside SGLang and 2 waiting for a weight version that never comes. The
scheduler (a child process of the server, found by its title or command line) is then killed:

1. with SIGKILL (it sends nothing: the adapter's process watch must notice), and, in a second
   server, by an exception-free SIGQUIT path (``--how sigquit``: SIGKILL the scheduler and also
   SIGQUIT the server, as SGLang's watchdog does when a scheduler fails);
2. every one of the 18 calls ends exactly once with ``engine_dead`` (a RolloutError), none hangs
   (a 120 s guard, reported as a failure, not a timing assertion);
3. the server exits with status 1 and its log names the engine's death; no SGLang process it
   started is left running.

Figures: seconds from the kill to the last engine_dead, and to the server's exit.

    python tests/gpu/engine_death.py [MODEL_DIR] [--how sigkill|sigquit|both]

MODEL_DIR defaults to /tmp/rw-tiny (written if missing: the kit's random tiny Qwen2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (  # noqa: E402
    CHECK_ENGINE_ARGS,
    TINY,
    TINY_HEAD_STD,
    TINY_STD,
    Report,
    device_info,
    prompts,
    wait_serving,
    write_qwen2,
)

N_RUNNING, N_WAITING = 16, 2


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def find_scheduler(server_pid: int) -> int | None:
    """SGLang titles its scheduler process ``sglang::scheduler...`` (setproctitle)."""
    for pid in children(server_pid):
        if "scheduler" in cmdline(pid):
            return pid
    return None


async def one_run(rep: Report, model: str, how: str) -> None:
    from rollwire import RolloutClient, SamplingParams
    from rollwire.clients.rollout import RolloutError
    from rollwire.messages import ErrorCode
    from rollwire.transports.sockets import free_tcp_endpoint

    ep = free_tcp_endpoint()
    cmd = [sys.executable, "-m", "rollwire.cli", "--log-level", "info", "serve", "--engine", "sglang", "--model",
           model, "--rollout-endpoint", ep, "--tp", "1", "--max-new-tokens-limit", "4000"]
    for k, v in CHECK_ENGINE_ARGS.items():
        cmd += ["--engine-arg", f"{k}={v}"]
    log_path = os.path.join(os.environ.get("OUT", "/tmp"), f"engine_death_{how}_serve.log")
    log = open(log_path, "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        async with RolloutClient(ep) as rc:
            await wait_serving(rc, server, timeout=600)
            started = children(server.pid)
            sched = find_scheduler(server.pid)
            rep.check(f"{how}: scheduler process found", sched is not None, children=len(started))
            if sched is None:
                return
            sp = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)  # < 4096 context
            calls = [asyncio.ensure_future(rc.generate(p, sp)) for p in prompts(N_RUNNING, TINY["vocab_size"])]
            calls += [asyncio.ensure_future(rc.generate([11, 12, 13], sp, min_version=99)) for _ in range(N_WAITING)]
            deadline = time.monotonic() + 120
            while True:  # bounded poll: all running inside SGLang, the others waiting for their version
                st = await rc.status(timeout=10)
                if st.in_flight == N_RUNNING + N_WAITING and st.counters.get("engine.in_sglang") == N_RUNNING:
                    break
                if time.monotonic() > deadline:
                    rep.check(f"{how}: requests in flight before the kill", False, status=str(st)[:500])
                    return
                await asyncio.sleep(0.1)
            rep.check(f"{how}: requests in flight before the kill", True, running=N_RUNNING, waiting=N_WAITING)
            os.kill(sched, signal.SIGKILL)
            if how == "sigquit":
                os.kill(server.pid, signal.SIGQUIT)  # what SGLang's watchdog sends when a scheduler fails
            t_kill = time.monotonic()
            try:
                results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
            except TimeoutError:
                rep.check(f"{how}: every call ended (no hang)", False, pending=sum(not c.done() for c in calls))
                return
            t_answered = time.monotonic() - t_kill
            codes = [r.code.value if isinstance(r, RolloutError) else type(r).__name__ for r in results]
            rep.check(f"{how}: every call ended once with engine_dead",
                      all(isinstance(r, RolloutError) and r.code == ErrorCode.ENGINE_DEAD for r in results),
                      codes=codes)
            rep.figure(f"{how}_kill_to_last_engine_dead_s", round(t_answered, 2))
        loop = asyncio.get_running_loop()
        try:
            rc_exit = await loop.run_in_executor(None, lambda: server.wait(timeout=120))
        except subprocess.TimeoutExpired:
            rc_exit = None
        rep.figure(f"{how}_kill_to_exit_s", round(time.monotonic() - t_kill, 2))
        log.flush()
        text = Path(log_path).read_text(errors="replace")
        rep.check(f"{how}: server exited with status 1", rc_exit == 1, returncode=rc_exit)
        rep.check(f"{how}: its log names the engine's death", "engine dead" in text or "engine_dead" in text)
        left = [p for p in started if alive(p)]
        rep.check(f"{how}: no SGLang process left running", not left, left=[cmdline(p)[:80] for p in left])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for p in started:  # never leave a GPU process behind for the next script
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        log.close()


async def main(a: Any) -> int:
    rep = Report("engine_death")
    print(device_info(), flush=True)
    if not os.path.exists(os.path.join(a.model, "config.json")):
        write_qwen2(a.model, TINY, std=TINY_STD, head_std=TINY_HEAD_STD)
    for how in (["sigkill", "sigquit"] if a.how == "both" else [a.how]):
        try:
            await one_run(rep, a.model, how)
        except Exception as e:
            rep.fail(f"{how}: run", e)
    summary = rep.write({"device": device_info()})
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="/tmp/rw-tiny")
    ap.add_argument("--how", choices=["sigkill", "sigquit", "both"], default="both")
    sys.exit(asyncio.run(main(ap.parse_args())))
