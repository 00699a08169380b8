"""The resumable hidden partial file of `distill generate`.

Finished prompts are appended (all samples of a prompt in one go, flushed) to a partial file beside the output,
with the settings that made it in a sidecar JSON. A rerun after a kill drops a torn last group, skips the finished
prompts, and refuses a partial file made with other prompts or sampling settings. The output appears, sorted by
(prompt_index, sample) and with duplicate completions removed, only when every prompt is done.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from distill import atomic
from distill.errors import DistillError

# Recipe keys of the settings that are not in the generate section, for error messages.
_SETTING_NAMES = {
    "seed": "training.seed",
    "teacher": "teacher.path",
    "dtype": "teacher.dtype",
    "prompts": "prompts file",
    "teacher_model": "teacher.model_name",
}


class PartialFile:
    """The append-only file of finished prompts, with the settings that made it in a sidecar JSON."""

    def __init__(self, output: Path, settings: dict, samples: int, log: Callable[[str], None]):
        self.path = output.with_name(f".{output.name}.partial")
        self.meta = output.with_name(f".{output.name}.partial.json")
        self.samples = samples
        self.done: set[int] = set()
        self._lock = threading.Lock()
        # A partial file with nothing in it holds no work to protect: start over with the new settings.
        started = self.path.exists() and self.path.stat().st_size > 0
        if started:
            self._check(settings)
            self._recover()
            if self.done:
                log(f"generate: resuming, {len(self.done)} prompts already done ({self.path})")
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.meta, settings)
            self.path.write_bytes(b"")
        self._file = self.path.open("ab")

    def _check(self, settings: dict) -> None:
        try:
            before = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DistillError(
                f"generate: {self.path} has no readable settings file {self.meta.name}; delete both to start over"
            ) from None
        changed = [key for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)]
        if changed:
            key = changed[0]
            if {"prompts_sha256", "prompt_count"} & set(changed):
                what = "set of prompts"
            else:
                name = _SETTING_NAMES.get(key, f"generate.{key}")
                what = f"{name} (was {before.get(key)!r}, now {settings.get(key)!r})"
            raise DistillError(
                f"generate: {self.path} was started with a different {what}; delete it and {self.meta.name} "
                "to start over, or restore the recipe"
            )

    def _recover(self) -> None:
        """Keep whole prompts only: a kill can tear the last line or leave a prompt's samples half-written."""
        data = self.path.read_bytes()
        keep = 0  # bytes of the file that hold complete prompts
        counts: dict[int, int] = {}
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            try:
                row = json.loads(data[start:end])
                index = int(row["prompt_index"])
            except (ValueError, KeyError, TypeError):
                break
            counts[index] = counts.get(index, 0) + 1
            start = end + 1
            if counts[index] == self.samples:
                keep = start
                self.done.add(index)
        if keep < len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def append(self, rows: list[dict]) -> None:
        """All samples of one prompt in one write, flushed to the OS: a kill after this loses nothing of it."""
        blob = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        with self._lock:
            self._file.write(blob)
            self._file.flush()
            self.done.add(rows[0]["prompt_index"])

    def finish(self, output: Path, prompts: int, dedupe: bool) -> tuple[int, int]:
        """Sort, drop duplicates, write `output` atomically, remove the partial file. Returns (rows, dropped)."""
        self._file.close()
        rows = [json.loads(line) for line in self.path.read_bytes().splitlines() if line.strip()]
        rows.sort(key=lambda r: (r["prompt_index"], r["sample"]))
        got = {r["prompt_index"] for r in rows}
        if len(rows) != prompts * self.samples or got != set(range(prompts)):
            raise DistillError(f"internal error: {self.path} holds {len(rows)} rows, expected {prompts * self.samples}")
        kept, seen = [], set()
        for r in rows:
            key = (r["prompt_index"], r["completion"])
            if dedupe and key in seen:
                continue
            seen.add(key)
            kept.append(r)
        atomic.write_text(output, (json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return len(kept), len(rows) - len(kept)

    def close(self) -> None:
        self._file.close()
