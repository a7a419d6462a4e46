"""The demo's trainer process: GRPO on the groups the workers send, weights pushed each step.

GRPO: rewards are normalised within each group (advantage = (r - mean) / (std + eps)); the loss is
PPO's clipped surrogate on the ratio between the trainer's current policy and the logprobs the
rollout server returned (same temperature, same action mask). Async with a staleness bound: a
group is used only if every token came from a version within ``max_staleness`` of the trainer's.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any

import torch

from rollwire.demo.task import Task
from rollwire.messages import Ack, Codec, ExperienceRequest, SampleGroup
from rollwire.models import tiny
from rollwire.transports import sockets
from rollwire.weightsync.publisher import TrainerPublisher


@dataclass
class TrainConfig:
    trainer_endpoint: str
    experience_endpoint: str
    steps: int
    groups_per_step: int
    lr: float
    clip: float
    temperature: float
    updates_per_step: int  # optimizer steps on each batch (PPO epochs; the clip keeps them close)
    max_staleness: int
    transport: str
    seed: int
    servers: int = 1  # a fleet: wait for all to join once, then push to whoever is live


def grpo_loss(model: Any, groups: list[SampleGroup], allowed: torch.Tensor, clip: float,
              temperature: float) -> tuple[torch.Tensor, int]:
    """Clipped GRPO surrogate over every sampled token of ``groups``; returns (loss, tokens)."""
    seqs, olds, advs, n_prompt = [], [], [], len(groups[0].prompt_ids)
    for g in groups:
        rewards = torch.tensor([s.reward for s in g.samples])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        for s, a in zip(g.samples, adv, strict=True):
            seqs.append([*g.prompt_ids, *s.output_ids])
            olds.append(s.output_logprobs)
            advs.append(float(a))
    ids = torch.tensor(seqs)
    logits = model(ids).logits[:, n_prompt - 1:-1].float() / temperature
    mask = torch.full((logits.shape[-1],), float("-inf"))
    mask[allowed] = 0.0
    logp_all = torch.log_softmax(logits + mask, dim=-1)  # same temperature and mask as sampling
    logp = logp_all.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)
    ratio = torch.exp(logp - torch.tensor(olds))
    adv_t = torch.tensor(advs)[:, None]
    surrogate = torch.minimum(ratio * adv_t, ratio.clamp(1 - clip, 1 + clip) * adv_t)
    return -surrogate.mean(), int(logp.numel())


async def _train(cfg: TrainConfig, metrics: Any, stop: Any) -> None:
    torch.manual_seed(cfg.seed)
    model, tok = tiny(seed=0)  # the same weights the server starts from (version 0)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    allowed = torch.tensor(Task(tok).letter_ids)
    codec: Codec[Any] = Codec(ExperienceRequest)
    exp = sockets.router([cfg.experience_endpoint])
    buffer: collections.deque[tuple[float, SampleGroup]] = collections.deque()
    got = asyncio.Event()

    async def collect() -> None:  # acknowledge and buffer groups while the trainer works
        while True:
            frames = await exp.recv_multipart()
            rid, group, _ = codec.decode(frames[1:])
            buffer.append((time.monotonic(), group))
            got.set()
            await sockets.send(exp, [frames[0], *codec.encode(rid, Ack())])

    collector = asyncio.ensure_future(collect())
    version = 0
    # a fleet: a server silent for 3 s is dropped from the pushes (its requests already moved)
    async with TrainerPublisher(cfg.trainer_endpoint, min_receivers=cfg.servers,
                                lost_after_s=3.0 if cfg.servers > 1 else 10.0) as tp:
        for step in range(1, cfg.steps + 1):
            t0 = time.monotonic()
            used: list[SampleGroup] = []
            dropped = tokens = 0
            staleness: list[int] = []
            while len(used) < cfg.groups_per_step and not stop.is_set():
                if not buffer:
                    got.clear()
                    await got.wait()
                    continue
                _, g = buffer.popleft()
                tokens += sum(len(s.output_ids) for s in g.samples)
                oldest = min(sp.version for s in g.samples for sp in s.weight_version_spans)
                if version - oldest > cfg.max_staleness:
                    dropped += 1
                    continue
                used.append(g)
                staleness.append(version - oldest)
            if stop.is_set():
                break
            t_rollout = time.monotonic() - t0
            for _ in range(cfg.updates_per_step):
                loss, _ = grpo_loss(model, used, allowed, cfg.clip, cfg.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
            version += 1
            await tp.publish_step(step=step, phase="train_end", require_all=cfg.servers == 1)
            report = await tp.push_weights(version=version, tensors=dict(model.state_dict()), transport=cfg.transport,
                                           require_all=cfg.servers == 1)
            tp.min_receivers = 1  # a fleet's server may die: the others go on
            rewards = [s.reward for g in used for s in g.samples]
            metrics.put({
                "step": step, "reward_mean": sum(rewards) / len(rewards), "weight_version": version,
                "tokens_per_s": tokens / max(1e-9, time.monotonic() - t0), "loss": float(loss.detach()),
                "push_s": report.seconds, "push_bytes": report.bytes, "rollout_wait_s": t_rollout,
                "servers_applied": len(report.receivers), "push_failed": sorted(report.failed),
                "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
                "groups_dropped_stale": dropped, "groups_used": len(used), "time": time.time(),
                "sample": Task(tok).text(used[0].samples[0].output_ids),
            })
    collector.cancel()
    exp.close(linger=0)


def trainer_main(cfg: TrainConfig, metrics: Any, stop: Any) -> None:
    import uvloop

    from rollwire.demo import child_setup

    child_setup()

    from rollwire.runtime.logging import configure_logging

    configure_logging()  # the parent's level ($ROLLWIRE_LOG_LEVEL)
    torch.set_num_threads(1)
    uvloop.run(_train(cfg, metrics, stop))
    metrics.put(None)
