"""The command line, as a user runs it: `rollwire serve` in its own process, `rollwire generate`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import subprocess
import sys

import pytest
import torch

from rollwire import RolloutClient, SamplingParams
from rollwire.cli import add_server_args, main, server_config
from rollwire.messages import ErrorCode, RollwireError
from rollwire.runtime.logging import LEVEL_ENV
from rollwire.server import ServerConfig

from .conftest import free_tcp_endpoint


def _serve(endpoint: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "serve", "--engine", "hf", "--model", "tiny",
                             "--rollout-endpoint", endpoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_serve_answers_generate_and_ctrl_c_gives_in_flight_requests_a_terminal_reply() -> None:
    ep = free_tcp_endpoint()
    proc = _serve(ep)
    try:
        async with RolloutClient(ep, timeout=60) as rc:
            await rc.wait_ready(timeout=120)
            gen = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "rollwire.cli", "generate", "--endpoint", ep, "--input-ids", "1,5,9",
                "--max-new-tokens", "6", "--logprobs", stdout=asyncio.subprocess.PIPE)
            stdout, _ = await gen.communicate()
            assert gen.returncode == 0
            printed = json.loads(stdout)
            assert len(printed["output_ids"]) <= 6 and len(printed["output_logprobs"]) == len(printed["output_ids"])

            in_flight = [asyncio.ensure_future(rc.generate([i + 1, 2], SamplingParams(
                max_new_tokens=4000, temperature=0.0, ignore_eos=True))) for i in range(3)]
            async with asyncio.timeout(60):  # Ctrl-C with all three generating (the server's own count)
                while (await rc.status()).counters.get("samples_in_flight", 0) < 3:
                    await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            outs = await asyncio.gather(*in_flight, return_exceptions=True)
        # every in-flight request got its terminal reply: shutting_down, saying where it was cut (a
        # Done with "abort" would read as the caller's own abort, and a fleet would not move it)
        assert all(isinstance(o, RollwireError) and o.code == ErrorCode.SHUTTING_DOWN for o in outs), outs
        assert all("the server is stopping" in str(o) for o in outs), outs
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read().decode() if proc.stdout else ""
    assert "server_stopped" in log, log


def test_bench_quick_prints_its_table_and_writes_both_paths_per_concurrency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "bench", "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["requests"], res["tokens"]) == (16, 16)
    assert [r["concurrency"] for r in res["rows"]] == [1, 16]
    for r in res["rows"]:  # both paths produced every token (figures, not assertions on speed)
        assert r["direct_tok_s"] > 0 and r["rollwire_tok_s"] > 0
        assert r["ratio"] == r["rollwire_tok_s"] / r["direct_tok_s"]
    assert "concurrency" in run.stdout and f"wrote {out}" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_serve_with_sglang_missing_fails_at_once_naming_the_extra() -> None:
    run = subprocess.run([sys.executable, "-m", "rollwire.cli", "serve", "--engine", "sglang", "--model", "tiny",
                          "--tp", "2", "--rollout-endpoint", free_tcp_endpoint()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "pip install 'rollwire[sglang]'" in run.stderr, run.stderr[-2000:]
    assert "server_ready" not in run.stdout + run.stderr  # it never started serving


@pytest.mark.parametrize(("argv", "refusal"), [
    (["--tp", "2"], "--engine hf takes no engine arguments (got ['tp_size'])"),
    (["--engine-arg", "mem_fraction_static=0.5"], "--engine hf takes no engine arguments"),
    (["--engine", "sglang", "--tp", "2", "--engine-arg", "tp-size=4"], "--tp 2 contradicts --engine-arg tp_size=4"),
    (["--engine", "sglang", "--dp", "0"], "--dp must be at least 1"),
    (["--engine-arg", "tp_size"], "--engine-arg expects key=value"),
])
def test_serve_refuses_engine_arguments_that_cannot_apply(argv: list[str], refusal: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "info")  # main() sets it for its children: restored after the test
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tiny", *argv])
    assert refusal in str(e.value)


def test_tp_and_dp_become_sglang_engine_args() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    cfg = server_config(parser.parse_args(["--engine", "sglang", "--tp", "2", "--dp", "2",
                                           "--engine-arg", "mem_fraction_static=0.6"]))
    assert cfg.engine_args == {"mem_fraction_static": "0.6", "tp_size": "2", "dp_size": "2"}
    hf = server_config(parser.parse_args(["--tp", "1"]))  # one device is what hf runs on anyway
    assert (hf.engine, hf.engine_args) == ("hf", {})


def test_shm_verify_defaults_to_while_loading_and_takes_only_its_two_values() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    assert server_config(parser.parse_args([])).shm_verify == "while_loading"
    assert server_config(parser.parse_args(["--shm-verify", "before_load"])).shm_verify == "before_load"
    with pytest.raises(SystemExit):
        parser.parse_args(["--shm-verify", "never"])
    with pytest.raises(ValueError, match="shm_verify"):
        ServerConfig(shm_verify="never")  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "says"), [
    (["serve", "--max-batch-size", "0"], "--max-batch-size: must be in 1..2147483647"),
    (["serve", "--client-timeout", "nan"], "--client-timeout: must be a finite number"),
    (["serve", "--max-in-flight", "-3"], "--max-in-flight: must be in 1..2147483647"),
    (["demo", "--steps", "0"], "--steps: must be in 1..2147483647"),
    # from an adversarial helper: each of these started, then broke requests or the process
    (["serve", "--max-new-tokens-limit", "99999999999999999999"], "--max-new-tokens-limit: must be in 1..2147483647"),
    pytest.param(["serve", "--device", "cuda"], "--device: cuda: this torch",  # was an AssertionError
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")),
    (["serve", "--device", "bogus"], "--device: Expected one of"),
    (["serve", "--rollout-endpoint", "tcp://127.0.0.1:-5"], "port -5 is not in 0..65535"),  # libzmq bound 65531
    (["gateway", "--session-ttl", "0"], "--session-ttl: must be more than 0"),  # spun a core at 100%
    (["gateway", "--request-timeout", "-1"], "--request-timeout: must be a finite number >= 0"),
    (["gateway", "--max-body-bytes", "-1"], "--max-body-bytes: must be in 1..2147483647"),
    (["gateway", "--max-sessions", "0"], "--max-sessions: must be in 1..2147483647"),
    (["gateway", "--port", "70000"], "--port: must be in 1..65535"),  # listened on 4464
    (["serve", "--max-staleness", "-1"], "--max-staleness: must be in 0..2147483647"),
    (["status", "--timeout", "nan"], "--timeout: must be a finite number"),
    (["--log-level", "bogus", "status"], "--log-level: invalid choice"),
    (["bench", "--requests", "0"], "--requests: must be in 1..2147483647"),  # was a ZeroDivisionError
    (["serve", "--rollout-endpoint", "foo://bar"], "rollwire: error: Protocol not supported"),
    (["serve", "--rollout-endpoint", "tcp://127.0.0.1:99999"], "port 99999 is not in 0..65535"),
    (["keys", "--dir", "KEYS", "../evil"], "key name '../evil'"),
    (["keys", "--dir", "KEYS", "server"], "exists: remove it first"),  # made once below, so a second time
])
def test_bad_values_end_in_one_line_and_exit_2_without_a_traceback(tmp_path, argv: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    """Before, --max-batch-size 0 crashed the engine at the first request, nonsense limits were
    accepted, and a refused endpoint or key file printed a traceback; keys overwrote a pair."""
    argv = [str(tmp_path / "k") if a == "KEYS" else a for a in argv]
    if argv[-1] == "server":
        subprocess.run([sys.executable, "-m", "rollwire.cli", *argv], check=True, capture_output=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "rollwire.cli", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_a_gateway_no_server_answers_exits_3_with_one_line_and_no_traceback() -> None:
    """(before: starlette's traceback of the RequestTimeout and "Application startup failed")"""
    port = free_tcp_endpoint(span=1).rpartition(":")[2]
    out = subprocess.run([sys.executable, "-m", "rollwire.cli", "gateway", "--port", port, "--start-timeout", "1",
                          "--rollout-endpoint", free_tcp_endpoint()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "gateway_no_server" in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr
