"""Experiment trackers (`training.report_to`): TensorBoard, W&B, MLflow and Trackio through accelerate's trackers.

They receive exactly what metrics.jsonl receives, at the same steps: `MetricsLog` hands each event to `Trackers.log`
(one place, the main process only). Each tracker is an optional extra; a missing one is refused before training
starts. The run's tracker ids are kept in output.dir/trackers.json so that `--resume` continues the same runs:
TensorBoard appends to output.dir/tensorboard/ and drops the killed run's events after the checkpoint (purge_step,
as metrics.jsonl drops its lines); W&B resumes the same run id (steps it already holds are not logged again:
the resumed run recomputes them identically); MLflow and Trackio continue the same run, where a redone step adds
a second point at that step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

from distill import atomic
from distill.config import Recipe
from distill.errors import DistillError
from distill.train.checkpoint import list_checkpoints

# The module each tracker needs (accelerate's TensorBoard tracker also takes tensorboardX).
_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
# The W&B project (WANDB_PROJECT overrides it), MLflow experiment (MLFLOW_EXPERIMENT_NAME) and Trackio project.
PROJECT = "distill"
IDS_FILE = "trackers.json"


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, with the extra that installs it (before any model loads)."""
    for name in names:
        if not any(_installed(module) for module in _MODULES[name]):
            raise DistillError(f"recipe key training.report_to: {name} is not installed: pip install 'distill[{name}]'")


def tracker_list(recipe: Recipe, resume: bool) -> list:
    """accelerate tracker objects for `Accelerator(log_with=...)`, set up to continue the run's own trackers when
    `resume` finds a checkpoint (ids from output.dir/trackers.json), or to start new ones."""
    names = list(dict.fromkeys(recipe.training.report_to))
    if not names:
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    out = Path(recipe.output.dir)
    checkpoints = list_checkpoints(out / "checkpoints") if resume else []
    resumed_step = int(checkpoints[-1].name.removeprefix("step-")) if checkpoints else 0
    ids = _read_ids(out) if resumed_step else {}
    trackers = []
    for name in names:
        if name == "tensorboard":
            # run_name "" puts the event files straight into output.dir/tensorboard/. On resume, TensorBoard drops the
            # killed run's events from the checkpoint's next step on, as metrics.jsonl drops its lines.
            purge = {"purge_step": resumed_step + 1} if resumed_step else {}
            trackers.append(TensorBoardTracker("", out / "tensorboard", **purge))
        elif name == "wandb":
            options = {"id": ids.get("wandb", {}).get("id") or secrets.token_hex(4), "resume": "allow"}
            if "WANDB_NAME" not in os.environ:
                options["name"] = out.name
            if "WANDB_DIR" not in os.environ:
                options["dir"] = str(out)  # wandb/ beside the run's other outputs
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), **options))
        elif name == "mlflow":
            run_id = ids.get("mlflow", {}).get("run_id")
            trackers.append(MLflowTracker(experiment_name=PROJECT, run_id=run_id, run_name=out.name))
        else:
            run_name = ids.get("trackio", {}).get("name") or f"{out.name}-{secrets.token_hex(3)}"
            trackers.append(TrackioTracker(PROJECT, name=run_name, resume="allow"))
    return trackers


class Trackers:
    """The run's trackers between `with` (started) and its end (finished); `log` takes metrics.jsonl events."""

    def __init__(self, accelerator, recipe: Recipe):
        self.accelerator, self.recipe = accelerator, recipe
        self.active = bool(recipe.training.report_to)

    def __enter__(self) -> Trackers:
        if not self.active:
            return self
        try:
            self.accelerator.init_trackers(PROJECT)
            config = _flat(self.recipe.model_dump(mode="json", by_alias=True))
            for tracker in self.accelerator.trackers:
                # TensorBoard stores hyperparameters as extra timestamped runs beside the scalars; recipe.yaml is there.
                if tracker.name != "tensorboard":
                    tracker.store_init_configuration(config)
        except Exception as e:  # a tracker's own start-up failure (no login, unreachable server): one line, exit 2
            message = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistillError(f"recipe key training.report_to: a tracker could not start: {message}") from None
        if self.accelerator.is_main_process:
            _write_ids(Path(self.recipe.output.dir), self.accelerator.trackers)
        return self

    def log(self, event: dict) -> None:
        """One metrics.jsonl event: its numbers, at its step (called on the main process only)."""
        if not self.active:
            return
        values = {k: v for k, v in event.items() if k not in ("event", "step") and _is_number(v)}
        self.accelerator.log(values, step=int(event["step"]))

    def __exit__(self, *exc) -> bool:
        # Each tracker's own finish, not accelerator.end_training: that also destroys the process group, which the
        # student's gathering and saving after the loop still need.
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
        return False


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flat(section: dict, prefix: str = "") -> dict:
    """The recipe as dotted keys with scalar values (lists and nulls as text): what trackers accept as config."""
    flat = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    return flat


def _read_ids(out: Path) -> dict:
    try:
        return json.loads((out / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_ids(out: Path, trackers) -> None:
    """What a resumed run needs to continue the same tracker runs."""
    ids = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb"] = {"id": tracker.run.id, "project": tracker.run.project}
        elif tracker.name == "mlflow":
            ids["mlflow"] = {"run_id": tracker.active_run.info.run_id}
        elif tracker.name == "trackio":
            ids["trackio"] = {"name": tracker.init_kwargs.get("name")}
    if ids:
        atomic.write_json(out / IDS_FILE, ids)
