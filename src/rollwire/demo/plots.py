"""reward.png and timeline.png for the demo (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rollwire.actors.memory_governor import GovernorState


def plot_reward(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], marker="o", ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(0, 1.02)
    ax.set_title("rollwire demo: GRPO reward per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STATES = [s.value for s in GovernorState]


def plot_timeline(timeline: list[tuple[float, str]], activity: list[tuple[float, int, str]],
                  rows: list[dict[str, Any]], path: Path) -> None:
    """Top: requests in flight over the run, a tick per applied push. Bottom: the governor's
    state machine around one push in the middle of the run, at millisecond resolution (LOADING is
    the GenerationActor's one pause + load + resume)."""
    busy = [a for a in activity if a[1] > 0]
    t0 = busy[0][0] if busy else timeline[0][0]
    fig, (top, zoom) = plt.subplots(2, 1, figsize=(10, 5.5))
    top.plot([a[0] - t0 for a in activity if a[0] >= t0], [a[1] for a in activity if a[0] >= t0], lw=0.8,
             color="#333", label="requests in flight (sampled every 50 ms)")
    for r in rows:
        top.axvline(r["time"] - t0, color="#1f77b4", lw=0.6, alpha=0.6)
    top.set_xlabel("seconds since the first request (blue: a weight version went live)")
    top.legend(fontsize=7, loc="upper right")
    top.set_title("rollwire demo: rollouts keep flowing while the trainer pushes a version every step")
    loads = [i for i, (_, s) in enumerate(timeline) if s.startswith("LOADING")]
    if loads:
        mid = loads[len(loads) // 2]
        lo, hi = max(0, mid - 2), min(len(timeline), mid + 3)
        window = timeline[lo:hi]
        base = window[0][0]
        xs = [(t - base) * 1000 for t, _ in window]
        ys = [STATES.index(s.split("(")[0]) if s.split("(")[0] in STATES else 0 for _, s in window]
        zoom.step(xs, ys, where="post", color="#d62728")
        for x, (_, s), y in zip(xs, window, ys, strict=True):
            zoom.annotate(s, (x, y), fontsize=7, xytext=(2, 4), textcoords="offset points")
        zoom.set_yticks(range(len(STATES)), STATES, fontsize=7)
        zoom.set_xlabel("milliseconds (one push, mid-run)")
        zoom.set_title("governor state machine around one push", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fleet(load: list[tuple[float, list[float]]], events: list[tuple[float, str]], rows: list[dict[str, Any]],
               servers: int, path: Path) -> None:
    """Samples in flight on each server over the run; the kill and the restart marked."""
    t0 = load[0][0] if load else 0.0
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for i in range(servers):
        ax.plot([t - t0 for t, _ in load], [row[i] for _, row in load], lw=0.9, label=f"server-{i}")
    for t, what in events:
        ax.axvline(t - t0, color="#d62728", lw=1.0, ls="--")
        ax.annotate(what, (t - t0, ax.get_ylim()[1] * 0.92), fontsize=7, rotation=90, ha="right")
    for r in rows:
        ax.axvline(r["time"] - t0, color="#1f77b4", lw=0.4, alpha=0.4)
    ax.set_xlabel("seconds (blue: a weight version went live)")
    ax.set_ylabel("samples in flight")
    ax.set_title(f"rollwire demo on a fleet of {servers}: load per server through a kill and a restart")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
