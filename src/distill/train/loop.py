"""The training loop: build models -> build data -> loop -> save. Reads top to bottom.

Exactness matters more than cleverness here. The loss of a step is the sum over every loss token of the
global batch divided by the number of those tokens, whatever the split into micro-batches and ranks. The data
order and the learning rate are pure functions of the step number, and checkpoints carry optimizer and RNG
states, so a run killed at any moment and resumed finishes with the same weights as an uninterrupted one.

The set-up lives in `setup.py`, one step's arithmetic in `step.py`, the saved student and the report in `output.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distill.config import Recipe
from distill.data import iter_batches
from distill.errors import DistillError
from distill.metrics import MetricsLog, ProgressDisplay
from distill.models import count_parameters
from distill.report.quality import evaluate_batches
from distill.report.tasks import require_lm_eval
from distill.train import lora
from distill.train.checkpoint import RunState, list_checkpoints, prune_checkpoints, rng_state, save_checkpoint
from distill.train.onpolicy import OnPolicy
from distill.train.output import TrainResult, save_student, saved_dtype, student_state, write_run_report
from distill.train.parallel import full_state_dicts, gather_objects, gathered_for_inference
from distill.train.setup import Run, pick_accelerator, prepare_output, set_up
from distill.train.step import optimizer_step, step_batches
from distill.train.trackers import Trackers, check_trackers, tracker_list


def train(recipe: Recipe, resume: bool = False, log: Callable[[str], None] = print, show_progress: bool = True):
    """Run `distill train`: returns the run folder, the saved student folder and the summary."""
    recipe.check_runnable()
    check_trackers(recipe.training.report_to)  # a missing extra stops here, before any model loads
    if recipe.report.enabled and recipe.report.tasks:
        require_lm_eval()
    accelerator = pick_accelerator(recipe, tracker_list(recipe, resume))
    if not accelerator.is_main_process:
        log = _silent  # one copy of each message, not one per process
    t, o = recipe.training, recipe.objective
    out, checkpoint = prepare_output(recipe, resume)
    torch.manual_seed(t.seed)
    run = set_up(recipe, accelerator, out, checkpoint, log)
    state, device = run.state, accelerator.device
    trackers = Trackers(accelerator, recipe)  # fed by metrics: the same events at the same steps
    metrics = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process, sink=trackers.log)
    metrics.truncate_after(state.step)
    on_policy = OnPolicy(recipe, run.models.tokenizer, run.train_examples, device, accelerator.autocast)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # found without a host sync per step
    window = LogWindow(device, hidden=o.hidden.weight > 0)
    run_start = time.perf_counter() - state.elapsed_s

    progress = ProgressDisplay(t.steps, state.step, enabled=show_progress and accelerator.is_main_process)
    with progress, trackers:
        for step in range(state.step, t.steps):
            lr = learning_rate(recipe, step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batches, global_tokens = step_batches(run, recipe, step, on_policy, accelerator)
            step_means, grad_norm = optimizer_step(run, recipe, batches, global_tokens, accelerator)  # (kd, ce, hidden)
            mean_loss = o.kd_weight * step_means[0] + o.ce_weight * step_means[1] + o.hidden.weight * step_means[2]
            bad = ~torch.isfinite(mean_loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), step + 1, first_bad_step)
            step_tokens = sum(int(b["attention_mask"].sum()) for b in batches) * run.world
            window.add(torch.cat([mean_loss[None], step_means]), step_tokens)
            state.step = step + 1
            state.tokens_seen += step_tokens
            state.loss_tokens_seen += global_tokens
            progress.advance(state.step)

            last = state.step == t.steps
            if state.step % t.log_every == 0 or last or state.step % t.save_every == 0:
                _stop_if_diverged(first_bad_step, out)
                event = window.event(state, lr, float(grad_norm), time.perf_counter() - run_start, on_policy)
                metrics.write(event)
                progress.show(loss=event["loss"], tokens_per_s=event["tokens_per_s"])
                window.reset()
            if state.step % t.eval_every == 0 or last:
                state.last_eval = _evaluate(run, recipe, accelerator, metrics)
            if state.step % t.save_every == 0 or last:
                state.elapsed_s = time.perf_counter() - run_start
                _save_checkpoint(run, out, t.keep_checkpoints, accelerator)

    close_signal = getattr(run.teacher_signal, "close", None)  # a served teacher's connections and threads
    if close_signal is not None:
        close_signal()
    summary = {
        "steps": state.step,
        "tokens": state.tokens_seen,
        "loss_tokens": state.loss_tokens_seen,
        "time_s": time.perf_counter() - run_start,
        "student_params": count_parameters(run.models.student),
        "teacher_params": count_parameters(run.models.teacher) if run.models.teacher is not None else None,
        "final_eval": state.last_eval,
    }
    if recipe.student.lora is not None:  # the saved student's size (merged), the adapter's and its settings
        summary.update(lora.summary_fields(run.models.student, run.models.teacher, lora.base_location(recipe, out)))
    student_dir = out / "student"
    # Under FSDP the student's weights are shards: gather them (every rank takes part) for rank 0 to save.
    gathered = student_state(run.loss_module) if run.strategy == "fsdp" else None
    if accelerator.is_main_process:
        models = run.models
        save_student(models.student, models.tokenizer, recipe, summary, student_dir, gathered, saved_dtype(recipe))
        if recipe.student.lora is not None:
            lora.save_adapter(models.student, out / "adapter", lora.base_location(recipe, out), gathered)
        del models, gathered
    accelerator.wait_for_everyone()
    log(f"student written to {student_dir}")
    result = TrainResult(output_dir=out, student_dir=student_dir, summary=summary)
    # A run from a cache can still be reported on when the recipe names the teacher (it is loaded for the report).
    teacher_known = run.models.teacher is not None or (
        (recipe.teacher.cache is not None or recipe.teacher.endpoint is not None) and recipe.teacher.path is not None
    )
    teacher_known = teacher_known or bool(recipe.teachers)  # several teachers: each one with a path is reported
    if accelerator.is_main_process and recipe.report.enabled and teacher_known:
        # The report loads teacher and student again from disk (the student as saved): let go of the training
        # copies, the optimizer state and accelerate's references to them first, or the report's models and
        # activations stack on top of training's and the whole run peaks above its training steps.
        eval_examples = run.eval_examples
        del run, on_policy
        accelerator.free_memory()  # drops accelerate's own references, then collects (modules hold cycles)
        write_run_report(recipe, result, eval_examples, accelerator.device, show_progress, log)
    return result


class LogWindow:
    """The steps since the last log line: their loss sums (on the device, no host sync per step), tokens and time."""

    def __init__(self, device: torch.device, hidden: bool = False):
        self.loss = torch.zeros(4, device=device)  # loss, kd, ce, hidden sums over the window's steps
        self.hidden = hidden  # hidden-state distillation is on: log its term too
        self.tokens, self.steps, self.start = 0, 0, time.perf_counter()

    def add(self, losses: torch.Tensor, tokens: int) -> None:
        """One step: its (loss, kd, ce, hidden) means (4,) and the tokens it read (every rank's)."""
        self.loss += losses
        self.tokens += tokens
        self.steps += 1

    def event(self, state: RunState, lr: float, grad_norm: float, elapsed_s: float, on_policy: OnPolicy) -> dict:
        """The metrics.jsonl line of the window: its mean losses, throughput and on-policy share."""
        now = time.perf_counter()
        means = (self.loss / max(self.steps, 1)).tolist()
        return {
            "event": "train",
            "step": state.step,
            "loss": means[0],
            "kd_loss": means[1],
            "ce_loss": means[2],
            **({"hidden_loss": means[3]} if self.hidden else {}),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state.tokens_seen,
            "tokens_per_s": self.tokens / max(now - self.start, 1e-9),
            "elapsed_s": elapsed_s,
            **on_policy.log_fields(now - self.start),
        }

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens, self.steps, self.start = 0, 0, time.perf_counter()


def _evaluate(run: Run, recipe: Recipe, accelerator, metrics: MetricsLog) -> dict:
    """Evaluate the student on the held-out examples (teacher too when it is loaded); the eval event, logged."""
    t, student = recipe.training, run.models.student
    student.eval()
    batches = iter_batches(run.eval_examples, max(1, run.micro), run.pad_id)
    if t.eval_batches:
        batches = (b for i, b in enumerate(batches) if i < t.eval_batches)
    with gathered_for_inference(run.loss_module):
        # A teacher with another tokenizer (objective.cross_tokenizer) cannot score the student's tokens: student only.
        teacher = run.models.teacher if run.cross is None else None
        result = evaluate_batches(student, teacher, batches, run.models.vocab_size, accelerator.device)
    student.train()
    event = {"event": "eval", "step": run.state.step, **{f"eval_{k}": v for k, v in result.items()}}
    metrics.write(event)
    return event


def _save_checkpoint(run: Run, out: Path, keep: int, accelerator) -> None:
    """Every rank gathers the whole weights, AdamW moments and RNG states; rank 0 writes them."""
    # Frozen weights (a LoRA student's base) are rebuilt from their source on resume: only trained ones are saved.
    model_state, optimizer_state = full_state_dicts(run.loss_module, run.torch_optimizer, trainable_only=True)
    rng_states = gather_objects(rng_state(), run.world)
    if accelerator.is_main_process:
        save_checkpoint(out / "checkpoints", model_state, optimizer_state, rng_states, run.state)
        prune_checkpoints(out / "checkpoints", keep)
    del model_state, optimizer_state
    accelerator.wait_for_everyone()


def learning_rate(recipe: Recipe, step: int) -> float:
    """LR of 0-based optimizer step `step`: linear warm-up, then cosine or linear decay to min_lr_ratio."""
    t = recipe.training
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape)


def _stop_if_diverged(first_bad_step: torch.Tensor, out: Path) -> None:
    bad_step = int(first_bad_step)
    if bad_step >= 0:
        kept = list_checkpoints(out / "checkpoints")
        last_good = f"; the last good checkpoint is {kept[-1]}" if kept else ""
        raise DistillError(f"the loss became NaN or infinite at step {bad_step} (try a lower training.lr){last_good}")


def _silent(_message: str) -> None:
    pass
