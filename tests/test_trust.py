"""Trust on the public sockets, with real CURVE keys and a real `rollwire serve` process:
only allow-listed clients get anything, internal actor links cannot be squatted, exposed
addresses need keys (or an explicit --insecure), ipc sockets live in a private directory."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from rollwire import RolloutClient, SamplingParams
from rollwire.clients.rollout import RolloutError
from rollwire.messages import Codec, ErrorCode, GenerateRequest, HealthRequest, RolloutReply
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports import sockets
from rollwire.transports.security import CurveClient, KeyPair, create_keys

from .conftest import free_tcp_endpoint

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("server", "worker", "trainer", "stranger"):
        create_keys(d, name)
    return d


def pair(keys: Path, name: str) -> KeyPair:
    return KeyPair.load(keys / f"{name}.key_secret")


def test_rollwire_keys_writes_a_public_key_and_a_secret_only_its_owner_reads(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "rollwire.cli", "keys", "--dir", str(tmp_path / "k"), "a", "b"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("a", "b"):
        secret = tmp_path / "k" / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        kp = KeyPair.load(secret)
        assert kp.secret is not None and KeyPair.load(tmp_path / "k" / f"{name}.key").public == kp.public
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700


async def test_with_curve_only_allow_listed_clients_are_served_and_strangers_get_nothing(keys: Path) -> None:
    ep = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", ep, "--secret-key", str(keys / "server.key_secret"),
                             "--client-keys", str(keys / "worker.key"), "--trainer-keys", str(keys / "trainer.key")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server_key = pair(keys, "server").public
    try:
        async with RolloutClient(ep, curve=CurveClient(pair(keys, "worker"), server_key)) as worker:
            await worker.wait_ready(timeout=120)
            before = (await worker.status()).counters.get("requests", 0.0)
            out = await worker.generate([1, 2, 3], GREEDY)
            assert out.finish_reason == "length"  # type: ignore[union-attr]
            async with worker.session() as s:  # the session socket is guarded the same way
                assert (await s.generate([4, 5], GREEDY)).finish_reason == "length"
            async with RolloutClient(ep, curve=CurveClient(pair(keys, "trainer"), server_key)) as trainer:
                assert (await trainer.status()).engine == "hf"  # a trainer may ask for status

            strangers = {
                "unknown key": CurveClient(pair(keys, "stranger"), server_key),
                "wrong server key": CurveClient(pair(keys, "worker"), pair(keys, "stranger").public),
                "no CURVE at all": None,
            }
            for why, curve in strangers.items():
                async with RolloutClient(ep, curve=curve, liveness_s=1.0) as rc:
                    results = await asyncio.gather(rc.generate([1, 2, 3], GREEDY), rc.status(timeout=30),
                                                   return_exceptions=True)
                    # neither call was served: each ends with the client-side typed error, nothing else
                    assert all(isinstance(r, RolloutError) and r.code == ErrorCode.SERVER_UNAVAILABLE
                               for r in results), (why, results)
            after = await worker.status()
            assert after.counters.get("requests", 0.0) - before == 1 + 1  # the worker's request and its turn only
        # a CURVE server stops on SIGTERM like any other (its ZAP authenticator once held it forever)
        proc.terminate()
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_peer_squatting_an_internal_actor_identity_on_the_public_socket_breaks_nothing() -> None:
    """The SessionActor reaches the GenerationActor as b"sessions" over an internal inproc socket;
    a public peer that takes that routing id first lands in another identity space."""
    ep = free_tcp_endpoint()
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv:
        ctx = zmq.asyncio.Context()
        squatter = ctx.socket(zmq.DEALER)
        squatter.setsockopt(zmq.IDENTITY, b"sessions")
        squatter.setsockopt(zmq.LINGER, 0)
        squatter.connect(ep)
        codec: Codec[object] = Codec(RolloutReply)
        await squatter.send_multipart(codec.encode(7, HealthRequest()))
        assert await squatter.poll(30_000)
        assert codec.decode(await squatter.recv_multipart())[0] == 7  # the squatter is answered as itself
        await squatter.send_multipart(codec.encode(8, GenerateRequest(input_ids=[1, 2], sampling_params=GREEDY)))
        async with RolloutClient(ep) as rc, rc.session() as s:
            done = await s.generate([4, 5, 6], GREEDY)  # the session turn crosses the internal link
            assert done.finish_reason == "length" and len(done.output_ids) == 4
        assert await squatter.poll(30_000)
        rid, reply, _ = codec.decode(await squatter.recv_multipart())
        assert rid == 8 and reply.finish_reason == "length"  # type: ignore[attr-defined]  # its own request: served once
        squatter.close()
        ctx.term()
        assert srv.generation.counters.get("replies_undeliverable") == 0


async def test_binding_a_non_loopback_address_without_keys_needs_insecure() -> None:
    cfg = ServerConfig(rollout_endpoint="tcp://0.0.0.0:0")  # refused before anything binds
    with pytest.raises(SystemExit, match="--insecure"):
        await RolloutServer(cfg).start()


async def test_ipc_sockets_refuse_a_directory_other_users_may_enter(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(PermissionError, match="other users"):
        sockets.router([f"ipc://{open_dir}/rw"])
    private = Path(sockets.ipc_endpoint("t").removeprefix("ipc://")).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == os.getuid()
    sock = sockets.router([sockets.ipc_endpoint("t")])  # the default place binds
    sockets.close_router(sock)
