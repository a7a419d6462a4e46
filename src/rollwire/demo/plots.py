"""reward.png and timeline.png for the demo (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STATE_COLORS = {"SERVING": "#d9f2d9", "PAUSING": "#ffe0b3", "PAUSED": "#ffcccc", "LOADING": "#cce0ff",
                "RESUMING": "#e6ccff", "RELEASED": "#dddddd"}


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


def plot_timeline(timeline: list[tuple[float, str]], activity: list[tuple[float, int, str]],
                  rows: list[dict[str, Any]], path: Path) -> None:
    """Governor states as colored bands, requests in flight as a line, pushes as ticks."""
    t0 = activity[0][0] if activity else timeline[0][0]
    end = activity[-1][0] if activity else timeline[-1][0]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for (t, state), nxt in zip(timeline, [*timeline[1:], (end, "")], strict=True):
        base = state.split("(")[0]
        if base != "SERVING":
            ax.axvspan(t - t0, max(nxt[0], t + 1e-3) - t0, color=STATE_COLORS.get(base, "#eee"), lw=0)
    ax.plot([a[0] - t0 for a in activity], [a[1] for a in activity], lw=0.8, color="#333", label="requests in flight")
    for r in rows:
        ax.axvline(r["time"] - t0, color="#1f77b4", lw=0.5, alpha=0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for s, c in STATE_COLORS.items() if s != "SERVING"]
    labels = [s for s in STATE_COLORS if s != "SERVING"]
    ax.legend([*ax.get_legend_handles_labels()[0], *handles], ["requests in flight", *labels], fontsize=7,
              loc="upper right", ncol=3)
    ax.set_xlabel("seconds")
    ax.set_title("governor states around each weight push (blue ticks: push done)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
