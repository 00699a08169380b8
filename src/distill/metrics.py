"""metrics.jsonl (one JSON object per event) and the progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from distill import atomic


class MetricsLog:
    """Append-only event log. On resume, events after the checkpoint's step are dropped so they are not
    reported twice when the resumed run redoes those steps. `sink` (the experiment trackers) receives every event
    written, so trackers and the file hold the same numbers at the same steps."""

    def __init__(self, path: Path, enabled: bool = True, sink: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.sink = sink

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, event: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        if self.sink is not None:
            self.sink(event)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed run: drop it


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class ProgressDisplay:
    """A rich progress bar with step, loss, tokens/s and ETA; silent when disabled."""

    def __init__(self, total: int, completed: int, enabled: bool = True):
        self.enabled = enabled
        self.total, self.completed = total, completed
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=self.completed, loss="-", rate="-"
            )
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def advance(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def show(self, loss: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, loss=f"{loss:.4f}", rate=f"{tokens_per_s:,.0f}")
