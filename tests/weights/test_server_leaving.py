"""A real `rollwire serve` process stopped with SIGTERM tells its trainer it leaves: the trainer
counts it out at once instead of after its liveness bound, and the next push goes to the servers
that are left without waiting for it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync.publisher import TrainerPublisher
from tests.conftest import until
from tests.versioned import version_state


def serve(endpoint: str, trainer: str, receiver_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, "--trainer-endpoint", trainer,
                             "--receiver-id", receiver_id],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_a_server_stopped_by_sigterm_is_counted_out_at_once_and_the_next_push_goes_to_the_rest() -> None:
    trainer = free_tcp_endpoint()
    procs = [serve(free_tcp_endpoint(), trainer, f"server-{i}") for i in range(2)]
    try:
        # liveness bound and push timeout far above the test's own waits: only the goodbye explains
        # server-1 leaving the roster in time
        async with TrainerPublisher(trainer, min_receivers=2, timeout_s=600, lost_after_s=600) as tp:
            first = await asyncio.wait_for(tp.push_weights(1, version_state(1), transport="shm"), 240)
            assert first.receivers == ["server-0", "server-1"], first
            procs[1].send_signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, procs[1].wait, 60)
            assert code == 0, code  # a clean stop
            await until(lambda: "server-1" not in tp.receivers, "the trainer forgot server-1", timeout=30)
            assert tp.receivers["server-0"].joined and not tp.counters  # nothing dropped or refused
            tp.min_receivers = 1
            second = await asyncio.wait_for(tp.push_weights(2, version_state(2), transport="shm"), 60)
            assert second.receivers == ["server-0"] and not second.failed, second
    finally:
        for p in procs:
            p.kill()
            p.wait()
