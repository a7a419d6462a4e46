"""Command line: ``rollwire serve | gateway | generate | status | keys | demo | bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import msgspec
import zmq

from rollwire.runtime.logging import LEVEL_ENV, configure_logging
from rollwire.server import RolloutServer, ServerConfig, run
from rollwire.transports import sockets
from rollwire.transports.security import CurveClient, KeyPair, create_keys

DEFAULT_ROLLOUT = "tcp://127.0.0.1:7500"


def as_builtins(obj: object) -> object:
    """Structs as dicts (they are msgpack arrays on the wire, but people read JSON objects)."""
    if isinstance(obj, msgspec.Struct):
        return {f: as_builtins(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, list):
        return [as_builtins(x) for x in obj]
    if isinstance(obj, dict):
        return {k: as_builtins(v) for k, v in obj.items()}
    return msgspec.to_builtins(obj)


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--input-ids expects comma-separated integers, got {text!r}") from None


INT_MAX = 2**31 - 1  # a larger count or size is no setting (one went out in a status reply: msgpack refused it)


def _int_in(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not low <= value <= INT_MAX:
        raise argparse.ArgumentTypeError(f"must be in {low}..{INT_MAX}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer in 1..2**31-1 (a limit of 0 would refuse or break every request)."""
    return _int_in(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer in 0..2**31-1."""
    return _int_in(text, 0)


def port(text: str) -> int:
    """An argparse type: a TCP port to listen on, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def device(text: str) -> str:
    """An argparse type: a torch device this process has (``cuda`` on a CPU-only torch is refused
    here, not by an assertion deep in the engine's start)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) sees no CUDA device")
    return text


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (a timeout or a lifetime)."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _engine_args(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value  # ServerArgs' field names (sglang takes either spelling)
    return out


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="hf", choices=["hf", "sglang"])
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built locally, seed 0), 'tiny:SEED', or a local HF checkpoint dir")
    p.add_argument("--rollout-endpoint", default=DEFAULT_ROLLOUT)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens-limit", type=positive_int, default=4096)
    p.add_argument("--max-batch-size", type=positive_int, default=64)
    p.add_argument("--engine-arg", action="append", default=[],
                   help="key=value, an sglang ServerArgs field passed through (e.g. mem_fraction_static=0.6)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (sglang's tp_size)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (sglang's dp_size)")
    p.add_argument("--trainer-endpoint", default=None, help="TrainerPublisher endpoint to take weights from")
    p.add_argument("--mode", default="disaggregated", choices=["colocated", "disaggregated"])
    p.add_argument("--pause-policy", default="retract", choices=["abort", "retract", "drain", "in_place"])
    p.add_argument("--drain-deadline", type=seconds, default=30.0, help="seconds drain waits before aborting")
    p.add_argument("--barrier-timeout", type=seconds, default=60.0,
                   help="a version loaded under a trainer's barrier resumes by itself after this long unreleased")
    p.add_argument("--coalesce", action="store_true", help="only the newest version waits behind a load")
    p.add_argument("--shm-verify", default="while_loading", choices=["while_loading", "before_load"],
                   help="shm buckets' checksums: hashed as the hf engine (CPU) copies them, one pass over the "
                        "bytes (a bad one: requests wait for the next whole version), or in a pass before the "
                        "pause (a bad one: the old version keeps serving)")
    p.add_argument("--max-staleness", type=non_negative_int, default=None,
                   help="requests started > K versions ago are aborted (retract policy: restarted from the prompt)")
    p.add_argument("--receiver-id", default="")
    p.add_argument("--session-endpoint", default=None,
                   help="SessionActor endpoint (default: a free tcp port on the rollout host, or <ipc path>-sessions)")
    p.add_argument("--max-sessions", type=positive_int, default=4096)
    p.add_argument("--max-session-tokens", type=positive_int, default=32768,
                   help="upper bound of a session's max_tokens")
    sec = p.add_argument_group("trust and liveness")
    sec.add_argument("--secret-key", default=None,
                     help="this server's .key_secret (from `rollwire keys`): turns CURVE on for every public socket")
    sec.add_argument("--client-keys", action="append", default=[],
                     help="rollout clients' .key files or directories of them (repeatable)")
    sec.add_argument("--trainer-keys", action="append", default=[],
                     help="trainers' .key files; the first is the trainer this server pulls weights from")
    sec.add_argument("--insecure", action="store_true",
                     help="allow binding a non-loopback tcp address without keys")
    sec.add_argument("--client-timeout", type=seconds, default=15.0,
                     help="seconds of silence after which a client is gone and its requests and sessions are freed "
                          "(rollwire clients beat every second, so keep it above ~3; 0: never)")
    fair = p.add_argument_group("fair sharing (per client: its CURVE key, else its connection)")
    fair.add_argument("--max-in-flight", type=positive_int, default=4096,
                      help="samples in flight in the server (overloaded)")
    fair.add_argument("--max-client-in-flight", type=positive_int, default=2048, help="samples in flight per client")
    fair.add_argument("--max-client-waiting", type=positive_int, default=1024,
                      help="requests per client waiting for a min_version")
    fair.add_argument("--max-client-sessions", type=positive_int, default=None,
                      help="sessions per client (default: half)")
    fair.add_argument("--retry-after", type=seconds, default=1.0, help="seconds overloaded/client_limit tell clients")


def add_client_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", default=None, help="this client's .key_secret (CURVE); needs --server-key")
    p.add_argument("--server-key", default=None, help="the server's public .key file")


def client_curve(a: argparse.Namespace) -> CurveClient | None:
    if (a.key is None) != (a.server_key is None):
        raise SystemExit("--key and --server-key go together")
    if a.key is None:
        return None
    return CurveClient(KeyPair.load(a.key), KeyPair.load(a.server_key).public)


def _all_engine_args(a: argparse.Namespace) -> dict[str, str]:
    """``--engine-arg`` pairs plus ``--tp``/``--dp``. The hf engine runs on one device and takes none
    (``--tp 1`` aside): refused there rather than silently ignored."""
    args = _engine_args(a.engine_arg)
    for flag, key in (("tp", "tp_size"), ("dp", "dp_size")):
        value = getattr(a, flag)
        if value is None:
            continue
        if value < 1:
            raise SystemExit(f"--{flag} must be at least 1, got {value}")
        if key in args and args[key] != str(value):
            raise SystemExit(f"--{flag} {value} contradicts --engine-arg {key}={args[key]}")
        args[key] = str(value)
    if a.engine == "hf":
        args = {k: v for k, v in args.items() if not (k in ("tp_size", "dp_size") and v == "1")}
    if a.engine == "hf" and args:
        raise SystemExit(f"--engine hf takes no engine arguments (got {sorted(args)}): they are for --engine sglang")
    return args


def server_config(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(engine=a.engine, model=a.model, rollout_endpoint=a.rollout_endpoint, device=a.device,
                        dtype=a.dtype, max_new_tokens_limit=a.max_new_tokens_limit,
                        max_batch_size=a.max_batch_size, engine_args=_all_engine_args(a),
                        trainer_endpoint=a.trainer_endpoint, mode=a.mode, pause_policy=a.pause_policy,
                        drain_deadline_s=a.drain_deadline, barrier_timeout_s=a.barrier_timeout,
                        coalesce=a.coalesce, shm_verify=a.shm_verify, max_staleness=a.max_staleness,
                        receiver_id=a.receiver_id, session_endpoint=a.session_endpoint,
                        max_sessions=a.max_sessions, max_session_tokens=a.max_session_tokens,
                        secret_key=a.secret_key, client_keys=a.client_keys, trainer_keys=a.trainer_keys,
                        insecure=a.insecure, client_timeout_s=a.client_timeout, max_in_flight=a.max_in_flight,
                        max_client_in_flight=a.max_client_in_flight, max_client_waiting=a.max_client_waiting,
                        max_client_sessions=a.max_client_sessions, retry_after_s=a.retry_after)


async def _generate(a: argparse.Namespace) -> int:
    from rollwire.clients.rollout import RolloutClient, RolloutError
    from rollwire.messages import SamplingParams

    sp = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    async with RolloutClient(a.endpoint, timeout=a.timeout, curve=client_curve(a)) as rc:
        try:
            out = await rc.generate(_ids(a.input_ids), sp, return_logprob=a.logprobs)
        except RolloutError as e:
            print(json.dumps({"error": e.code.value, "message": e.message}))
            return 1
    print(json.dumps(as_builtins(out)))
    return 0


async def _status(a: argparse.Namespace) -> int:
    from rollwire.clients.rollout import RolloutClient, RolloutError

    async with RolloutClient(a.endpoint, curve=client_curve(a)) as rc:
        try:
            print(json.dumps(as_builtins(await rc.status(timeout=a.timeout))))
        except RolloutError as e:
            print(json.dumps({"error": e.code.value, "message": e.message}))
            return 1
    return 0


def _keys(a: argparse.Namespace) -> int:
    for name in a.names:
        public, secret = create_keys(a.dir, name)
        print(f"{name}: public {public}  secret {secret}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Errors in what the user gave (an endpoint ZeroMQ refuses, a port in use, a missing file or
    directory, a bad value) end in one line on stderr and exit status 2; ``--log-level debug``
    shows their traceback."""
    try:
        return _main(argv)
    except (zmq.ZMQError, OSError, ValueError) as e:
        if os.environ.get(LEVEL_ENV) == "debug":
            raise
        print(f"rollwire: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the command's own handling (imports, startup)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="rollwire", description=__doc__)
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info (demo: warning, its view shows progress)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a rollout server in the foreground (Ctrl-C stops it)")
    add_server_args(s)

    gw = sub.add_parser("gateway", help="the OpenAI-compatible HTTP face in front of one or many rollout servers")
    from rollwire.gateway.server import add_gateway_args

    add_gateway_args(gw)

    g = sub.add_parser("generate", help="send one request, print the output as JSON")
    g.add_argument("--endpoint", default=DEFAULT_ROLLOUT)
    g.add_argument("--input-ids", required=True, help="comma-separated token ids, e.g. 1,5,9")
    g.add_argument("--max-new-tokens", type=positive_int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--timeout", type=positive_seconds, default=60.0)
    add_client_key_args(g)

    st = sub.add_parser("status", help="print a server's status as JSON")
    st.add_argument("--endpoint", default=DEFAULT_ROLLOUT)
    st.add_argument("--timeout", type=positive_seconds, default=5.0)
    add_client_key_args(st)

    k = sub.add_parser("keys", help="make CURVE key pairs: NAME.key (public, give it out) and NAME.key_secret (0600)")
    k.add_argument("names", nargs="+", help="e.g. server trainer worker")
    k.add_argument("--dir", default="keys", help="directory to write them in (created mode 0700)")

    from rollwire.bench import add_bench_args
    from rollwire.demo import add_demo_args

    add_bench_args(sub.add_parser("bench", help="tokens/s through rollwire vs the engine called directly (CPU)"))

    add_demo_args(sub.add_parser("demo", help="the main job on the embedded engine, on CPU, in minutes"))

    a = parser.parse_args(argv)
    if a.log_level is None:
        a.log_level = "warning" if a.cmd == "demo" else "info"
    os.environ[LEVEL_ENV] = a.log_level  # for the processes it spawns
    configure_logging(a.log_format, a.log_level)
    if a.cmd == "serve":
        server = RolloutServer(server_config(a))
        status = int(run(server.serve_forever()))  # type: ignore[call-overload]
        sockets.end_context()  # the replies still queued go out before the process exits
        if server.exit_reason is not None:
            print(f"rollwire serve: stopped: {server.exit_reason}", file=sys.stderr)
        return status
    if a.cmd == "keys":
        return _keys(a)
    if a.cmd == "gateway":
        from rollwire.gateway.server import run_gateway

        return run_gateway(a)
    if a.cmd == "generate":
        return int(run(_generate(a)))  # type: ignore[call-overload]
    if a.cmd == "status":
        return int(run(_status(a)))  # type: ignore[call-overload]
    if a.cmd == "bench":
        from rollwire.bench import run_bench

        return run_bench(a)
    if a.cmd == "demo":
        from rollwire.demo import run_demo

        return run_demo(a)
    parser.error(f"unknown command {a.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
