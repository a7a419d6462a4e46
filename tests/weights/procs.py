"""Processes for the cross-process tests (spawned: real processes, killed for real). Imports are
inside the functions: a spawned child imports this module first, and should not pay for more."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any


def tiny_weights(kind: str) -> dict[str, Any]:
    """The server's own weights ("original"), the same plus seeded noise ("perturbed"), the
    originals less their last two tensors ("partial"), or perturbed ones with one tensor the engine
    must refuse: "bad_shape", "bad_dtype", "unknown" (an extra name)."""
    import torch

    from rollwire.models import tiny

    model, _ = tiny(seed=0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind in ("perturbed", "bad_shape", "bad_dtype", "unknown"):
        g = torch.Generator().manual_seed(1234)
        sd = {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in sd.items()}
    if kind == "partial":
        sd = dict(list(sd.items())[:-2])
    if kind == "bad_shape":
        sd["lm_head.weight"] = sd["lm_head.weight"][:-1]
    elif kind == "bad_dtype":
        sd["lm_head.weight"] = sd["lm_head.weight"].double()
    elif kind == "unknown":
        sd["no.such.weight"] = torch.zeros(2)
    return sd


def _faulty_trainer_class() -> Any:
    from rollwire.weightsync.publisher import TrainerPublisher

    class FaultyTrainer(TrainerPublisher):
        """Fault injection: with ``corrupt_next``, the next shm push flips the first byte of its first
        bucket after checksumming it, before flagging the piece written (what receivers read no
        longer matches the checksum the trainer writes)."""

        corrupt_next = False
        mid_pack: str | None = None  # "die" (SIGKILL) or "fail" (the pack raises) after piece 0 of the next shm push

        async def _prepare(self, push: Any, sender: Any, step: int, receivers: Any) -> Any:
            from rollwire.messages.weights import ShmPayload

            ready = await super()._prepare(push, sender, step, receivers)
            if not isinstance(ready.payload, ShmPayload):
                return ready
            sender = self._senders["shm"]
            header, first, flag = sender._header, ready.payload.offsets[0], sender._header.piece_written
            corrupt, self.corrupt_next = self.corrupt_next, False
            mid_pack, self.mid_pack = self.mid_pack, None

            first_flagged = threading.Event()  # pieces are packed on several threads

            def faulty_flag(index: int) -> None:
                if corrupt and index == 0:
                    sender.arena.tensor[first] = 255 - int(sender.arena.tensor[first])
                if mid_pack and index > 0:
                    first_flagged.wait(30)  # piece 0 is written and flagged first, whichever thread is faster
                    if mid_pack == "die":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("fault injection: the pack fails after piece 0")
                flag(index)
                if index == 0:
                    first_flagged.set()

            header.piece_written = faulty_flag
            return ready

    return FaultyTrainer


def _dying_trainer_class(die_at: int) -> Any:
    from rollwire.weightsync.publisher import TrainerPublisher

    class DyingTrainer(TrainerPublisher):
        """Fault injection: SIGKILLs its own process when asked for bucket ``die_at`` (mid-push)."""

        async def _on_pull(self, peer: bytes, key: str, rid: int, msg: Any) -> None:
            if msg.index == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            await super()._on_pull(peer, key, rid, msg)

    return DyingTrainer


async def _drive(endpoint: str, weights: dict[str, Any], commands: Any, results: Any, die_at: int | None,
                 bucket_bytes: int, pub_endpoint: str | None, curve_files: Any = None) -> None:
    from rollwire.weightsync.publisher import PushError

    cls = _faulty_trainer_class() if die_at is None else _dying_trainer_class(die_at)
    kw: dict[str, Any] = {}
    if curve_files is not None:  # (this trainer's .key_secret, [servers' .key files])
        from rollwire.transports.security import KeyPair, load_public_keys

        kw.update(keys=KeyPair.load(curve_files[0]), receiver_keys=load_public_keys(curve_files[1]))
    async with cls(endpoint, timeout_s=30, bucket_bytes=bucket_bytes, pub_endpoint=pub_endpoint, **kw) as tp:
        results.put(("started", tp.trainer_id))
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, commands.get)
            if cmd is None:
                break
            if cmd[0] == "step":  # ("step", step, phase)
                results.put(("stepped", await tp.publish_step(cmd[1], cmd[2])))
                continue
            if cmd[0] == "corrupt_next":
                tp.corrupt_next = True
                continue
            if cmd[0] == "mid_pack":  # ("mid_pack", "die" | "fail")
                tp.mid_pack = cmd[1]
                continue
            version, kind, transport = cmd
            try:
                report = await tp.push_weights(version, weights[kind], transport=transport)
                results.put(("ok", report.version, report.transport, report.receivers))
            except PushError as e:
                results.put(("failed", version, transport, e.failures))
            except RuntimeError as e:  # the trainer's own failure (fault injection)
                results.put(("error", version, transport, str(e)))


def trainer_main(endpoint: str, weights: dict[str, Any], commands: Any, results: Any, die_at: int | None = None,
                 bucket_bytes: int = 512 << 20, device: str = "cpu", pub_endpoint: str | None = None,
                 curve_files: Any = None) -> None:
    """Push what ``commands`` says: (version, key into ``weights``, transport), publish a step
    message: ("step", step, phase), corrupt the next shm push: ("corrupt_next",), or end its pack
    after the first piece: ("mid_pack", "die" | "fail"); None stops. The
    weights come from the parent as CPU tensors (building the model here would import transformers:
    seconds) and are moved to ``device`` here (cuda: the push is from GPU memory)."""
    import torch

    torch.set_num_threads(1)
    weights = {kind: {k: v.to(device) for k, v in sd.items()} for kind, sd in weights.items()}
    asyncio.run(_drive(endpoint, weights, commands, results, die_at, bucket_bytes, pub_endpoint, curve_files))


async def _receive(endpoint: str, receiver_id: str, commands: Any, results: Any, curve_files: Any) -> int:
    import inspect

    from rollwire.actors.weight_receiver import WeightReceiverActor
    from rollwire.runtime import ActorSystem, address
    from tests.weights.harness import ApplySink

    kw: dict[str, Any] = {}
    params = inspect.signature(WeightReceiverActor).parameters
    if "register_timeout_s" in params:
        kw.update(register_timeout_s=0.2, trainer_silence_s=2.0)
    if curve_files is not None:
        from rollwire.transports.security import CurveClient, KeyPair

        kw["curve"] = CurveClient(KeyPair.load(curve_files[0]), KeyPair.load(curve_files[1]).public)
    system = ActorSystem()
    await system.spawn(lambda: ApplySink(name="sink"))
    await system.spawn(lambda: WeightReceiverActor(endpoint, receiver_id=receiver_id, name="receiver",
                                                   apply_endpoint=address("sink", "weights"), stall_timeout_s=1, **kw))
    results.put(("started",))
    loop = asyncio.get_running_loop()
    failed = getattr(system, "failed", None)
    while True:
        cmd = await loop.run_in_executor(None, commands.get)
        receiver, sink = system.actor("receiver"), system.actor("sink")
        if cmd is None:
            break
        results.put(("report", receiver.counters.snapshot(), receiver.counters.get("restarts"),
                     {v: {k: float(t.double().sum()) for k, t in ts.items()} for v, ts in sink.applied.items()},
                     [(m.step, m.phase) for m in sink.steps], bool(failed is not None and failed.done())))
    await system.stop()
    return 0


def receiver_main(endpoint: str, receiver_id: str, commands: Any, results: Any, curve_files: Any = None) -> None:
    """A WeightReceiverActor (applying into an ApplySink) in its own process; ``("report",)`` puts
    its counters, restarts, applied versions (tensor sums), step messages seen, and whether
    supervision gave up; None stops it."""
    raise SystemExit(asyncio.run(_receive(endpoint, receiver_id, commands, results, curve_files)))


def attach_and_sum(name: str, out: Any) -> None:
    """Attach an arena in another process, report a sum of its first bytes, exit normally."""
    from rollwire.weightsync.shm import attach

    arena = attach(name)
    out.put(int(arena.tensor[:1024].sum()))


def create_arena_and_wait(out: Any) -> None:
    """Make an arena, report its name, then wait to be SIGKILLed (its arena is left behind)."""
    import time

    from rollwire.weightsync.shm import ShmArena

    arena = ShmArena()
    arena.reserve(1 << 20)
    out.put(arena.name)
    time.sleep(600)
