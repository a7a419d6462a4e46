"""The demo's terminal view: a live rich table on a TTY, plain lines otherwise (CI, pipes)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

COLUMNS = [("step", "{}"), ("reward_mean", "{:.3f}"), ("tokens_per_s", "{:.0f}"), ("weight_version", "v{}"),
           ("push_s", "{:.3f}"), ("pause_s", "{:.3f}"), ("staleness_mean", "{:.2f}"), ("groups_dropped_stale", "{}"),
           ("servers_applied", "{}"), ("sample", "{}")]
HEADERS = ["step", "reward", "tok/s", "live", "push s", "pause s", "stale", "dropped", "servers", "a sample"]


class View:
    def __init__(self, steps: int, *, plain: bool, config: dict[str, Any]) -> None:
        self.console = Console()
        self.plain = plain or not sys.stdout.isatty()
        self.rows: list[dict[str, Any]] = []
        self.steps = steps
        head = (f"rollwire demo: GRPO on the tiny model, {config['workers']} rollout workers, trainer pushes "
                f"weights over {config['transport']} each step, pause policy {config['pause_policy']}, "
                f"max staleness {config['max_staleness']}")
        print(head, flush=True)
        self.live: Live | None = None
        if not self.plain:
            self.progress = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
            self.task = self.progress.add_task("steps", total=steps)
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.start()

    def _render(self) -> Group:
        table = Table(*HEADERS, title="per step")
        for r in self.rows[-15:]:
            table.add_row(*(fmt.format(r.get(k, "")) for k, fmt in COLUMNS))
        return Group(self.progress, table)

    def update(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.live is None:
            print("  ".join(f"{h}={fmt.format(row.get(k, ''))}" for h, (k, fmt) in zip(HEADERS, COLUMNS, strict=True)),
                  flush=True)
            return
        self.progress.update(self.task, completed=len(self.rows))
        self.live.update(self._render())

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()

    def summary(self, s: dict[str, Any], out: Path) -> None:
        print(f"reward: first steps {s['reward_first']:.3f} -> last steps {s['reward_last']:.3f} "
              f"over {s['steps']} steps (live weight version v{s['weight_version']})")
        plots = ["reward.png", "fleet.png" if s.get("servers", 1) > 1 else "timeline.png"]
        print(f"wrote {out / 'metrics.jsonl'}, " + ", ".join(str(out / p) for p in plots), flush=True)
