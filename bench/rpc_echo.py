"""RPC echo across processes: rollwire's actor runtime and RpcClient vs raw pyzmq DEALER/ROUTER.

Every run is a fresh server process and a fresh client process on the same transport (tcp
127.0.0.1 by default; ipc with ``--transport ipc`` or ``both``). asyncio processes run on uvloop.
Every server answers a HealthRequest with the same HealthReply bytes, so any client can talk to
any server and the rows differ only in the code on each side:

  raw_sync   blocking pyzmq ROUTER loop  <-  blocking pyzmq DEALER
  raw_async  zmq.asyncio ROUTER loop     <-  zmq.asyncio DEALER (the floor the targets refer to)
  rollwire   ActorSystem + Actor with a sync @handles(HealthRequest) handler  <-  RpcClient.call(HealthRequest())
             The handler replies with self.reply_nowait(...) where the Actor has it, else with
             self.spawn(self.reply(...)) (a sync handler cannot await; the JSON records which).
  diagnostic rows: the same actor with an async handler (as GenerationActor.on_health is written),
  with a sync handler that sends without a task (Actor.reply_nowait, or a prototype of it built on
  two Actor internals while the Actor lacks it), and each rollwire side against the raw asyncio
  other side (where the cost sits).

Per run: warm-up, then ``--calls`` sequential round trips (p50/p99 latency), then ``--messages``
echoes with ``--window`` in flight (msgs/s; the rollwire client runs ``--window`` concurrent
callers, the raw clients keep a window of sends ahead of their receives). Each config runs
``--repeats`` times, configs interleaved round-robin so machine noise falls on all of them alike;
the table shows medians and the ratios against raw_async measured in the same invocation.

    python bench/rpc_echo.py [--quick] [--repeats 5] [--transport tcp|ipc|both] [--configs ...]
                             [--out bench/out/rpc_echo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

# name -> (server kind, client kind, what it shows)
CONFIGS: dict[str, tuple[str, str, str]] = {
    "raw_sync": ("raw_sync", "raw_sync", "blocking pyzmq both sides"),
    "raw_async": ("raw_async", "raw_async", "zmq.asyncio + uvloop both sides (the floor)"),
    "rollwire": ("rw_sync", "rollwire", "Actor sync handler (reply_nowait, else spawn(reply)) <- RpcClient.call"),
    "rw_async_handler": ("rw_async", "rollwire", "Actor async handler (as GenerationActor) <- RpcClient"),
    "rw_reply_nowait": ("rw_nowait", "rollwire", "Actor sync handler sending without a task <- RpcClient"),
    "rw_server_only": ("rw_sync", "raw_async", "rollwire server <- raw asyncio client"),
    "rw_client_only": ("raw_async", "rollwire", "raw asyncio server <- RpcClient.call"),
    "rw_spawn_reply": ("rw_spawn", "rollwire", "Actor sync handler + spawn(reply) <- RpcClient.call"),
    # trust and liveness (issue 14): the same rollwire ends with CURVE, with client heartbeats
    "rollwire_curve": ("rw_sync+curve", "rollwire+curve", "rollwire both ends, CURVE (Ironhouse) on"),
    "raw_async_curve": ("raw_async+curve", "raw_async+curve", "raw asyncio both ends, CURVE on (its floor)"),
    "rollwire_heartbeat": ("rw_sync", "rollwire+hb", "rollwire, client heartbeats every 1 s (RolloutClient's default)"),
}
TARGET_CURVE_P50 = 1.2  # rollwire_curve p50 <= 1.2 x rollwire plain


HEADLINE = "rollwire"
FLOOR = "raw_async"
TARGET_P50_RATIO = 1.3  # rollwire p50 <= 1.3 x raw asyncio
TARGET_RATE_RATIO = 1.0  # rollwire pipelined >= raw asyncio (issue 15)

from rpc_echo_ends import _endpoint, _has_reply_nowait, run_client, run_server  # noqa: E402


# -- orchestration ------------------------------------------------------------------------------
def _one_run(config: str, transport: str, a: argparse.Namespace) -> dict[str, float]:
    server_kind, client_kind, _ = CONFIGS[config]
    endpoint = _endpoint(transport)
    me = [sys.executable, os.path.abspath(__file__)]
    server = subprocess.Popen([*me, "--role", "server", "--kind", server_kind, "--endpoint", endpoint],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"{config}: server {server_kind} did not start (said {line!r})")
        client = subprocess.run(
            [*me, "--role", "client", "--kind", client_kind, "--endpoint", endpoint, "--server-pid", str(server.pid),
             "--calls", str(a.calls),
             "--messages", str(a.messages), "--window", str(a.window), "--warmup", str(a.warmup)],
            stdout=subprocess.PIPE, text=True, timeout=300, check=True)
        return json.loads(client.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if endpoint.startswith("ipc://"):
            Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure(a: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for transport in (["tcp", "ipc"] if a.transport == "both" else [a.transport]):
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in a.configs}
        for rep in range(a.repeats):
            for config in a.configs:
                r = _one_run(config, transport, a)
                runs[config].append(r)
                print(f"  {transport} rep {rep + 1}/{a.repeats} {config:<17} p50 {r['p50_us']:7.1f} us  "
                      f"p99 {r['p99_us']:7.1f} us  {r['msgs_per_s']:9.0f} msg/s", file=sys.stderr, flush=True)
        medians = {c: _median(rs) for c, rs in runs.items()}
        floor = medians.get(FLOOR)
        rows = {}
        for c, m in medians.items():
            row: dict[str, Any] = {"server": CONFIGS[c][0], "client": CONFIGS[c][1], "what": CONFIGS[c][2],
                                   **m, "runs": runs[c]}
            if floor is not None:
                row["p50_vs_raw_async"] = m["p50_us"] / floor["p50_us"]
                row["p99_vs_raw_async"] = m["p99_us"] / floor["p99_us"]
                row["rate_vs_raw_async"] = m["msgs_per_s"] / floor["msgs_per_s"]
            rows[c] = row
        targets = {}
        if floor is not None and HEADLINE in rows:
            h = rows[HEADLINE]
            targets = {"p50_ratio": h["p50_vs_raw_async"], "p50_target": TARGET_P50_RATIO,
                       "p50_met": h["p50_vs_raw_async"] <= TARGET_P50_RATIO,
                       "rate_ratio": h["rate_vs_raw_async"], "rate_target": TARGET_RATE_RATIO,
                       "rate_met": h["rate_vs_raw_async"] >= TARGET_RATE_RATIO}
        if HEADLINE in rows and "rollwire_curve" in rows:
            ratio = rows["rollwire_curve"]["p50_us"] / rows[HEADLINE]["p50_us"]
            targets.update({"curve_p50_ratio": ratio, "curve_p50_target": TARGET_CURVE_P50,
                            "curve_p50_met": ratio <= TARGET_CURVE_P50,
                            "curve_rate_ratio": rows["rollwire_curve"]["msgs_per_s"] / rows[HEADLINE]["msgs_per_s"]})
        if HEADLINE in rows and "rollwire_heartbeat" in rows:
            targets.update({
                "heartbeat_p50_ratio": rows["rollwire_heartbeat"]["p50_us"] / rows[HEADLINE]["p50_us"],
                "heartbeat_rate_ratio": rows["rollwire_heartbeat"]["msgs_per_s"] / rows[HEADLINE]["msgs_per_s"]})
        results[transport] = {"rows": rows, "targets": targets}
    return results


def _print(res: dict[str, Any], a: argparse.Namespace) -> None:
    for transport, r in res.items():
        print(f"\nRPC echo over {transport}: {a.calls} sequential calls, {a.messages} msgs with {a.window} in flight;"
              f" medians of {a.repeats} runs (fresh server + client processes each)")
        print(f"{'':<17} {'':<10} {'':<10} {'sequential':^26} {'pipelined':^19} "
              f"{'CPU us/msg, client+server':^27}")
        print(f"{'config':<17} {'server':<10} {'client':<10} {'p50 us':>8} {'p99 us':>8} {'p50/raw':>8} "
              f"{'msg/s':>9} {'rate/raw':>9} {'seq':>13} {'pipelined':>13}")
        for c, row in r["rows"].items():
            seq = f"{row['seq_client_cpu_us']:.0f}+{row['seq_server_cpu_us']:.0f}"
            pipe = f"{row['pipe_client_cpu_us']:.0f}+{row['pipe_server_cpu_us']:.0f}"
            print(f"{c:<17} {row['server']:<10} {row['client']:<10} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f} "
                  f"{row.get('p50_vs_raw_async', float('nan')):>8.2f} {row['msgs_per_s']:>9.0f} "
                  f"{row.get('rate_vs_raw_async', float('nan')):>9.2f} {seq:>13} {pipe:>13}")
        print(f"(the rollwire row's handler replies with {a.reply_path}; "
              f"rw_reply_nowait is {'Actor.reply_nowait' if a.reply_path == 'reply_nowait' else 'a prototype of it'})")
        t = r["targets"]
        if "curve_p50_ratio" in t:
            print(f"CURVE on vs off (rollwire both ends): p50 {t['curve_p50_ratio']:.2f}x (<= {TARGET_CURVE_P50}: "
                  f"{'met' if t['curve_p50_met'] else 'MISSED'}), pipelined rate {t['curve_rate_ratio']:.2f}x")
        if "heartbeat_p50_ratio" in t:
            print(f"heartbeats on vs off: p50 {t['heartbeat_p50_ratio']:.2f}x, pipelined rate "
                  f"{t['heartbeat_rate_ratio']:.2f}x (1.00 = not measurable)")
        if "p50_ratio" in t:
            print(f"targets ({HEADLINE} vs {FLOOR}): p50 {t['p50_ratio']:.2f}x (<= {t['p50_target']}: "
                  f"{'met' if t['p50_met'] else 'MISSED'}), pipelined {t['rate_ratio']:.2f}x "
                  f"(>= {t['rate_target']}: {'met' if t['rate_met'] else 'MISSED'})")
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print(f"load average at the end: {load[0]:.1f} on {os.cpu_count()} CPUs "
              "(latency is sensitive to it; CPU per message much less so)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (tox -e bench)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transport", choices=["tcp", "ipc", "both"], default="tcp")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                    help="default: all (rw_spawn_reply only once the Actor has reply_nowait: until then it is "
                         "the headline)")
    ap.add_argument("--calls", type=int, default=5000, help="sequential round trips per run")
    ap.add_argument("--messages", type=int, default=20_000, help="pipelined echoes per run")
    ap.add_argument("--window", type=int, default=200, help="requests in flight when pipelined")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--out", default="bench/out/rpc_echo.json")
    ap.add_argument("--role", choices=["main", "server", "client"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "server":
        run_server(a.kind, a.endpoint)
        return
    if a.role == "client":
        print(json.dumps(run_client(a.kind, a.endpoint, a)))
        return
    has_nowait = _has_reply_nowait()
    a.reply_path = "reply_nowait" if has_nowait else "spawn(reply)"
    if a.configs is None:
        a.configs = [c for c in CONFIGS if has_nowait or c != "rw_spawn_reply"]
    if a.quick:
        a.repeats, a.calls, a.messages, a.warmup = 1, 1000, 10_000, 200
        a.configs = [c for c in a.configs if c in ("raw_sync", "raw_async", "rollwire")]
    command = " ".join(["python", "bench/rpc_echo.py", *sys.argv[1:]])
    print(f"$ {command}", file=sys.stderr)
    t0 = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as keys:  # fresh CURVE pairs for the +curve configs
        from rollwire.transports.security import create_keys

        create_keys(keys, "server")
        create_keys(keys, "client")
        os.environ["ROLLWIRE_BENCH_KEYS"] = keys
        res = measure(a)
    _print(res, a)
    out = {"command": command, "seconds": time.perf_counter() - t0,
           "params": {k: getattr(a, k) for k in ("repeats", "calls", "messages", "window", "warmup", "configs")},
           "env": {"python": platform.python_version(), "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
                   "msgspec": msgspec.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                   "loadavg_before": load_before, "loadavg_after": os.getloadavg() if load_before else None},
           "rollwire_reply_path": a.reply_path,
           "results": res}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
