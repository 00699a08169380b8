"""The training loop: build models -> build data -> loop -> save. Reads top to bottom.

Exactness matters more than cleverness here. The loss of a step is the sum over every loss token of the
global batch divided by the number of those tokens, whatever the split into micro-batches and ranks. The data
order and the learning rate are pure functions of the step number, and checkpoints carry optimizer and RNG
states, so a run killed at any moment and resumed finishes with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import atomic
from distill.config import Recipe
from distill.data import (
    collate,
    data_fingerprint,
    forward_inputs,
    iter_batches,
    load_data,
    pad_id_of,
    step_example_indices,
)
from distill.errors import DistillError
from distill.losses.dense import IGNORE_INDEX
from distill.losses.heads import output_head
from distill.metrics import MetricsLog, ProgressDisplay
from distill.models import (
    DTYPES,
    Models,
    check_vocabulary,
    compare_tokenizers,
    count_parameters,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    new_model_from_config,
    resolve_dtype,
    stored_dtype,
)
from distill.report.evaluate import evaluate_batches
from distill.train.checkpoint import (
    RunState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.train.onpolicy import OnPolicy
from distill.train.parallel import (
    StudentLoss,
    clip_gradients,
    full_state_dicts,
    gather_objects,
    gathered_for_inference,
    load_full_state_dicts,
    no_gradient_sync,
    pick_strategy,
    shard_student,
    shard_teacher,
)

# Recipe sections whose change makes a checkpoint meaningless for this run.
_RESUME_SENSITIVE = ("teacher", "student", "data", "objective")
# Training keys that shape the weights: the learning-rate schedule (steps, warm-up, decay), the data order, the
# update itself. The rest (device, distributed, log/eval/save intervals, checkpoints kept) may change on resume.
_RESUME_SENSITIVE_TRAINING = (
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "seed",
    "weight_decay",
    "betas",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "mixed_precision",
)


@dataclass
class TrainResult:
    output_dir: Path
    student_dir: Path
    summary: dict


# ---------------------------------------------------------------- set-up


def pick_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    device = recipe.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise DistillError("recipe key training.device: cuda was asked for but no GPU is visible")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # accelerate's own FSDP wrapping would fight distill's (which keeps the fused loss inside the wrapper).
        raise DistillError(
            "accelerate was launched with FSDP settings (--use_fsdp or an FSDP config); launch with plain "
            "`accelerate launch --num_processes N` and set training.distributed=fsdp in the recipe instead"
        )
    precision = recipe.training.mixed_precision
    if precision == "auto":
        bf16 = torch.cuda.is_available() and device != "cpu" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "no"
    # accelerate only sets up a multi-process CPU run (gloo) when told it is on CPU.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return Accelerator(cpu=device == "cpu" or (device == "auto" and no_accelerator), mixed_precision=precision)


def _check_context(recipe: Recipe, config, role: str) -> None:
    context = max_context(config)
    if context is not None and recipe.data.max_length > context:
        raise DistillError(
            f"recipe key data.max_length: {recipe.data.max_length} is beyond the {role}'s context of {context} tokens"
        )


def load_models(
    recipe: Recipe,
    device: torch.device,
    student_init: Path | None = None,
    log=print,
    teacher_device: torch.device | None = None,
) -> Models:
    """Teacher (frozen, eval mode, recipe dtype), student (fp32 master weights, on CPU) and the shared tokenizer.

    The teacher goes to `teacher_device` (default `device`); FSDP keeps it on CPU until its layers are sharded.
    """
    t, s = recipe.teacher, recipe.student
    use_teacher = recipe.needs_teacher and t.path is not None and t.cache is None
    teacher_config = None
    if t.path is not None:
        teacher_config = load_config(t.path, "teacher", t.trust_remote_code, t.revision)
        _check_context(recipe, teacher_config, "teacher")
    student_source = str(student_init) if student_init is not None else s.path
    if student_source is not None:
        _check_context(recipe, load_config(student_source, "student", s.trust_remote_code, s.revision), "student")

    tokenizer_source = s.tokenizer or t.path or _cached_tokenizer(t.cache) or student_source
    if tokenizer_source == t.path:
        tokenizer = load_tokenizer(t.path, "teacher", t.trust_remote_code, t.revision)
    else:
        tokenizer = load_tokenizer(tokenizer_source, "student", s.trust_remote_code, s.revision)
    # The student's own tokenizer must agree with the one whose ids the teacher (or its cache) speaks.
    teacher_side = t.path is not None or t.cache is not None
    own_tokenizer = student_source is not None and student_source != tokenizer_source and has_tokenizer(student_source)
    if teacher_side and own_tokenizer:
        difference = compare_tokenizers(tokenizer, load_tokenizer(student_source, "student", s.trust_remote_code))
        if difference is not None:
            raise DistillError(
                f"teacher and student tokenizers differ ({difference}); logit distillation needs one tokenizer"
            )

    if student_source is not None:
        student = load_model(student_source, "student", torch.float32, s.trust_remote_code, s.revision)
    else:
        student = new_model_from_config(s.config, len(tokenizer), torch.float32, recipe.training.seed, tokenizer)
        _check_context(recipe, student.config, "student")
    teacher = None
    if use_teacher:
        teacher = load_model(t.path, "teacher", resolve_dtype(t.dtype, device), t.trust_remote_code, t.revision)
        teacher.eval()
        teacher.requires_grad_(False)
        teacher.to(teacher_device or device)
    vocab_size = check_vocabulary(tokenizer, teacher, student)
    log(
        f"student: {count_parameters(student) / 1e6:.2f}M parameters"
        + (f"; teacher: {count_parameters(teacher) / 1e6:.2f}M parameters" if teacher is not None else "")
        + f"; vocabulary: {vocab_size} tokens"
    )
    return Models(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=vocab_size)


def _cached_tokenizer(cache: str | None) -> str | None:
    """The tokenizer files a `distill cache` folder keeps (None without a cache or for an older cache)."""
    if cache is None:
        return None
    from distill.cache.reader import cache_tokenizer_dir

    folder = cache_tokenizer_dir(cache)
    return str(folder) if folder is not None else None


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


# ---------------------------------------------------------------- loss


def step_loss(
    loss_module, models: Models, batch: dict[str, torch.Tensor], recipe: Recipe, normalizer: float, teacher_signal
):
    """(loss to back-propagate, divergence sum, cross-entropy sum) of one micro-batch.

    The teacher's signal is computed here, without gradients: stored targets from a cache, the teacher's last
    hidden states (fused path: its head is applied chunk by chunk inside the loss) or its logits. The student's
    side runs inside `loss_module` (a `distill.train.parallel.StudentLoss`, possibly wrapped by DDP or FSDP). The sums
    run over the micro-batch's loss tokens; the loss is kd_weight·kd_sum + ce_weight·ce_sum divided by
    `normalizer`, the global batch's loss-token count (per rank).
    """
    from distill.losses.heads import backbone_hidden_states

    o = recipe.objective
    inputs, labels = forward_inputs(batch), batch["labels"]
    signal = {}
    if o.kd_weight > 0 and teacher_signal is not None:
        # Stored targets, one row per position of the (B, T-1) label grid.
        signal["sparse"] = teacher_signal.targets(batch["example_index"], labels.shape[1], labels.device)
    elif o.kd_weight > 0 and models.teacher is not None:
        with torch.no_grad():
            if o.fused:
                hidden = backbone_hidden_states(models.teacher, **inputs)
                signal["teacher_hidden"] = hidden[:, :-1]  # (B, T-1, Ht)
            else:
                logits = models.teacher(**inputs).logits
                signal["teacher_logits"] = logits[:, :-1, : models.vocab_size]  # (B, T-1, V)
    return loss_module(inputs, labels, normalizer, **signal)


# ---------------------------------------------------------------- the run


def _prepare_output(recipe: Recipe, resume: bool) -> tuple[Path, Path | None]:
    out = Path(recipe.output.dir)
    checkpoints = list_checkpoints(out / "checkpoints")
    saved_recipe = out / "recipe.yaml"
    if checkpoints and not resume:
        raise DistillError(
            f"output.dir {out} already holds checkpoints of a run; pass --resume to continue it or choose another"
        )
    if resume and checkpoints and saved_recipe.exists():
        from distill.config import load_recipe

        before = load_recipe(saved_recipe)
        for section in _RESUME_SENSITIVE:
            if getattr(before, section) != getattr(recipe, section):
                raise DistillError(f"--resume: recipe section {section} changed since the run started")
        for key in _RESUME_SENSITIVE_TRAINING:
            if getattr(before.training, key) != getattr(recipe.training, key):
                raise DistillError(f"--resume: recipe key training.{key} changed since the run started")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(saved_recipe, recipe.to_yaml())
    return out, (checkpoints[-1] if resume and checkpoints else None)


def _student_init(recipe: Recipe, out: Path, log) -> Path | None:
    """Build the pruned student once per run folder (kept for resume)."""
    spec = recipe.student.from_teacher
    if spec is None:
        return None
    folder = out / "student-init"
    if not folder.exists():
        from distill.student.build import build_student

        build_student(
            recipe.teacher.path,
            folder,
            layers=spec.layers,
            params=spec.params,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            heads=spec.heads,
            calibration=spec.calibration or recipe.data.train,
            layer_selection=spec.layer_selection,
            trust_remote_code=recipe.teacher.trust_remote_code,
            log=log,
        )
    return folder


def _teacher_signal(recipe: Recipe, models: Models, train_examples):
    """Where the teacher's distributions come from: None (online teacher or no teacher) or a cache reader,
    checked against this tokenizer and this list of training examples."""
    if recipe.teacher.cache is None or not recipe.needs_teacher:
        return None
    from distill.cache.reader import open_cache_for_training

    return open_cache_for_training(recipe, models.tokenizer, train_examples, models.vocab_size)


def train(recipe: Recipe, resume: bool = False, log: Callable[[str], None] = print, show_progress: bool = True):
    """Run `distill train`: returns the run folder, the saved student folder and the summary."""
    recipe.check_runnable()
    accelerator = pick_accelerator(recipe)
    if not accelerator.is_main_process:
        log = _silent  # one copy of each message, not one per process
    t = recipe.training
    out, checkpoint = _prepare_output(recipe, resume)
    torch.manual_seed(t.seed)
    student_init = _student_init(recipe, out, log)
    world, rank = accelerator.num_processes, accelerator.process_index
    strategy = pick_strategy(t.distributed, world)
    # Under FSDP the teacher reaches the device only as shards: a teacher larger than one device still loads.
    shards_teacher = strategy == "fsdp" and t.shard_teacher
    teacher_device = torch.device("cpu") if shards_teacher else accelerator.device
    models = load_models(recipe, accelerator.device, student_init, log, teacher_device)
    tokenizer, pad_id = models.tokenizer, pad_id_of(models.tokenizer)
    train_examples, eval_examples = load_data(recipe, tokenizer, log)
    teacher_signal = _teacher_signal(recipe, models, train_examples)
    if recipe.objective.fused:
        _check_fused_heads(models, train_examples[0].input_ids[:16])

    per_rank = t.batch_size // world
    if per_rank * world != t.batch_size or per_rank % t.grad_accum:
        raise DistillError(
            f"recipe key training.batch_size: {t.batch_size} does not split into {world} processes "
            f"× {t.grad_accum} micro-batches"
        )
    micro = per_rank // t.grad_accum

    if strategy == "fsdp" and accelerator.mixed_precision == "fp16":
        raise DistillError("training.mixed_precision=fp16 does not work with training.distributed=fsdp; use bf16")
    if world > 1:
        log(f"{world} processes, {strategy.upper()}; {per_rank} sequences per process and step")
    if shards_teacher and models.teacher is not None:
        shard_teacher(models.teacher, accelerator.device)
    teacher_head = None
    if recipe.objective.fused and models.teacher is not None:
        teacher_head = output_head(models.teacher)
    student = models.student  # the plain Hugging Face model: evaluation, sampling and saving use it
    student.train()
    loss_module = StudentLoss(student, recipe.objective, models.vocab_size, teacher_head)
    if strategy == "fsdp":
        shard_student(loss_module, accelerator.mixed_precision)  # before the optimizer: it sees the shards
    optimizer = torch.optim.AdamW(
        _parameter_groups(loss_module, t.weight_decay),
        lr=t.lr,
        betas=t.betas,
        foreach=False,  # one code path on every device keeps resumed and uninterrupted runs bitwise equal
    )
    if strategy != "fsdp":
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)  # DDP when several processes
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one

    state = RunState()
    fingerprint = data_fingerprint(train_examples)
    if checkpoint is not None:
        state = _resume(checkpoint, loss_module, torch_optimizer, world, rank, accelerator.is_main_process)
        if state.data_fingerprint and state.data_fingerprint != fingerprint:
            raise DistillError(
                f"--resume: the training examples differ from the checkpoint's (data.train {recipe.data.train} "
                "was changed or rewritten since the run started); start a new run in another output.dir"
            )
        log(f"resumed from {checkpoint} (step {state.step})")
    state.data_fingerprint = fingerprint
    metrics = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process)
    metrics.truncate_after(state.step)

    eval_micro = max(1, micro)

    def run_eval(step: int) -> dict:
        student.eval()
        batches = iter_batches(eval_examples, eval_micro, pad_id)
        if t.eval_batches:
            batches = (b for i, b in enumerate(batches) if i < t.eval_batches)
        with gathered_for_inference(loss_module):
            result = evaluate_batches(student, models.teacher, batches, models.vocab_size, accelerator.device)
        student.train()
        event = {"event": "eval", "step": step, **{f"eval_{k}": v for k, v in result.items()}}
        metrics.write(event)
        return event

    o = recipe.objective
    device = accelerator.device
    on_policy = OnPolicy(recipe, tokenizer, train_examples, device, accelerator.autocast)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # found without a host sync per step
    window_loss = torch.zeros(3, device=device)  # loss, kd, ce sums over steps since the last log line
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    run_start = time.perf_counter() - state.elapsed_s

    progress = ProgressDisplay(t.steps, state.step, enabled=show_progress and accelerator.is_main_process)
    with progress:
        for step in range(state.step, t.steps):
            lr = learning_rate(recipe, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = step_example_indices(len(train_examples), t.seed, step, t.batch_size)
            mine = indices[rank * per_rank : (rank + 1) * per_rank]
            micro_examples = [[train_examples[i] for i in mine[j : j + micro]] for j in range(0, per_rank, micro)]
            # On an on-policy step (GKD) the student's own completions of the same prompts replace the data.
            with gathered_for_inference(loss_module) if on_policy.chooses(step) else nullcontext():
                micro_examples = on_policy.examples(student, step, rank, micro_examples)
            batches = [collate(examples, pad_id) for examples in micro_examples]
            for j, b in enumerate(batches):
                b["example_index"] = torch.tensor(mine[j * micro : (j + 1) * micro])  # (B,) for a teacher cache
            local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            global_tokens = local_tokens
            if world > 1:
                global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
            # DDP averages gradients over ranks, so each rank divides by the global count / world size.
            normalizer = max(global_tokens, 1) / world
            step_sums = torch.zeros(2, device=device)
            for j, batch in enumerate(batches):
                # Example indices stay on the host: the cache reader needs them there, and copying back would sync.
                batch = {k: v if k == "example_index" else v.to(device) for k, v in batch.items()}
                sync = j == len(batches) - 1
                # Backward inside too: FSDP2 decides whether to reduce gradients during backward, DDP in forward.
                with nullcontext() if sync else no_gradient_sync(loss_module, accelerator, strategy):
                    with accelerator.autocast():
                        loss, kd_sum, ce_sum = step_loss(loss_module, models, batch, recipe, normalizer, teacher_signal)
                    accelerator.backward(loss)
                step_sums += torch.stack([kd_sum.float(), ce_sum.float()])
            # With clipping off the norm is still measured (an infinite threshold clips nothing): a user watching
            # for exploding gradients needs it most when nothing holds them back.
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
            grad_norm = clip_gradients(loss_module, accelerator, max_norm, strategy)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            if world > 1:  # the logged loss is the global batch's, not this rank's share of it
                step_sums = accelerator.reduce(step_sums, "sum")
            step_means = step_sums / max(global_tokens, 1)
            mean_loss = o.kd_weight * step_means[0] + o.ce_weight * step_means[1]
            bad = ~torch.isfinite(mean_loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), step + 1, first_bad_step)
            window_loss += torch.stack([mean_loss, step_means[0], step_means[1]])
            window_steps += 1
            step_tokens = sum(int(b["attention_mask"].sum()) for b in batches) * world
            window_tokens += step_tokens
            state.step = step + 1
            state.tokens_seen += step_tokens
            state.loss_tokens_seen += global_tokens
            progress.advance(state.step)

            last = state.step == t.steps
            if state.step % t.log_every == 0 or last or state.step % t.save_every == 0:
                _stop_if_diverged(first_bad_step, out)
                now = time.perf_counter()
                means = (window_loss / max(window_steps, 1)).tolist()
                rate = window_tokens / max(now - window_start, 1e-9)
                event = {
                    "event": "train",
                    "step": state.step,
                    "loss": means[0],
                    "kd_loss": means[1],
                    "ce_loss": means[2],
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": state.tokens_seen,
                    "tokens_per_s": rate,
                    "elapsed_s": now - run_start,
                    **on_policy.log_fields(now - window_start),
                }
                metrics.write(event)
                progress.show(loss=means[0], tokens_per_s=rate)
                window_loss.zero_()
                window_tokens, window_steps, window_start = 0, 0, now
            if state.step % t.eval_every == 0 or last:
                state.last_eval = run_eval(state.step)
            if state.step % t.save_every == 0 or last:
                state.elapsed_s = time.perf_counter() - run_start
                model_state, optimizer_state = full_state_dicts(loss_module, torch_optimizer)  # every rank gathers
                rng_states = gather_objects(rng_state(), world)
                if accelerator.is_main_process:
                    save_checkpoint(out / "checkpoints", model_state, optimizer_state, rng_states, state)
                    prune_checkpoints(out / "checkpoints", t.keep_checkpoints)
                del model_state, optimizer_state
                accelerator.wait_for_everyone()

    summary = {
        "steps": state.step,
        "tokens": state.tokens_seen,
        "loss_tokens": state.loss_tokens_seen,
        "time_s": time.perf_counter() - run_start,
        "student_params": count_parameters(student),
        "teacher_params": count_parameters(models.teacher) if models.teacher is not None else None,
        "final_eval": state.last_eval,
    }
    student_dir = out / "student"
    # Under FSDP the student's weights are shards: gather them (every rank takes part) for rank 0 to save.
    student_state = _student_state(loss_module) if strategy == "fsdp" else None
    if accelerator.is_main_process:
        save_student(student, tokenizer, recipe, summary, student_dir, student_state, saved_dtype(recipe))
    accelerator.wait_for_everyone()
    log(f"student written to {student_dir}")
    result = TrainResult(output_dir=out, student_dir=student_dir, summary=summary)
    # A run from a cache can still be reported on when the recipe names the teacher (it is loaded for the report).
    teacher_known = models.teacher is not None or (recipe.teacher.cache is not None and recipe.teacher.path is not None)
    if accelerator.is_main_process and recipe.report.enabled and teacher_known:
        # The report loads teacher and student again from disk (the student as saved): let go of the training
        # copies, the optimizer state and accelerate's references to them first, or the report's models and
        # activations stack on top of training's and the whole run peaks above its training steps.
        del optimizer, torch_optimizer, loss_module, student, models, teacher_head, teacher_signal, on_policy
        accelerator.free_memory()  # drops accelerate's own references, then collects (modules hold cycles)
        write_run_report(recipe, result, eval_examples, accelerator.device, show_progress, log)
    return result


def write_run_report(recipe: Recipe, result: TrainResult, eval_examples, device, show_progress: bool, log) -> None:
    """Evaluate teacher and student on the held-out examples and write report.json/.md/.html.

    The held-out examples are saved as `eval-data.jsonl` (token ids + loss masks) so `distill eval` can
    reproduce the report, or add other students to it, on exactly the same tokens.
    """
    from distill.report.evaluate import evaluate_models

    eval_file = result.output_dir / "eval-data.jsonl"
    rows = "".join(json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask}) + "\n" for e in eval_examples)
    atomic.write_text(eval_file, rows)
    r = recipe.report
    models = {"student": str(result.student_dir)}
    if r.baseline is not None:
        models["baseline"] = r.baseline
    evaluate_models(
        recipe.teacher.path,
        models,
        str(eval_file),
        str(result.output_dir),
        max_length=recipe.data.max_length,
        batch_size=max(1, recipe.training.batch_size // recipe.training.grad_accum),
        max_rows=r.max_rows,
        generation=r.generation,
        speed=r.speed,
        device=str(device),
        dtype=recipe.teacher.dtype,
        show_progress=show_progress,
        log=log,
    )


def _parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norms."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resume(checkpoint: Path, loss_module, optimizer, world: int, rank: int, is_main: bool) -> RunState:
    """Restore weights, AdamW moments and this rank's RNG state; only rank 0 reads the tensors (it broadcasts)."""
    saved = load_checkpoint(checkpoint, tensors=is_main)
    load_full_state_dicts(loss_module, optimizer, saved.model, saved.optimizer, world)
    # A run resumed with another number of processes reuses the saved states in turn.
    set_rng_state(*saved.rng[rank % len(saved.rng)])
    return saved.state


def _student_state(loss_module) -> dict[str, torch.Tensor] | None:
    """The student's whole weights keyed as the Hugging Face model names them (rank 0; None elsewhere)."""
    model_state, _ = full_state_dicts(loss_module, None)
    prefix = "student."
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)} or None


def _silent(_message: str) -> None:
    pass


def _check_fused_heads(models: Models, ids: list[int]) -> None:
    """Fail before training when the fused path would not see the logits the model itself produces."""
    from distill.losses.heads import verify_output_head

    for role, model in (("student", models.student), ("teacher", models.teacher)):
        if model is None:
            continue
        was_training = model.training
        model.eval()  # no dropout: the comparison must be deterministic
        try:
            with torch.no_grad():
                verify_output_head(model, torch.tensor([ids], device=next(model.parameters()).device))
        except ValueError as e:
            raise DistillError(f"objective.fused: {role}: {e}; set objective.fused=false") from None
        finally:
            model.train(was_training)


def _stop_if_diverged(first_bad_step: torch.Tensor, out: Path) -> None:
    bad_step = int(first_bad_step)
    if bad_step >= 0:
        kept = list_checkpoints(out / "checkpoints")
        last_good = f"; the last good checkpoint is {kept[-1]}" if kept else ""
        raise DistillError(f"the loss became NaN or infinite at step {bad_step} (try a lower training.lr){last_good}")


def saved_dtype(recipe: Recipe) -> torch.dtype:
    """output.dtype, with auto = the stored dtype of what the student started from (float32 when unknown).

    Training keeps float32 master weights; saving a student that began as a bfloat16 checkpoint in float32 would
    double its folder and understate the report's size-on-disk ratio.
    """
    name = recipe.output.dtype
    if name != "auto":
        return DTYPES[name]
    s, t = recipe.student, recipe.teacher
    if s.path is not None:
        stored = stored_dtype(load_config(s.path, "student", s.trust_remote_code, s.revision))
    elif s.from_teacher is not None:
        stored = stored_dtype(load_config(t.path, "teacher", t.trust_remote_code, t.revision))
    else:
        config = s.config or {}
        stored = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch."))
    return stored or torch.float32


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; tensors that shared storage (tied embeddings) still share it."""
    cast_of: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))  # the same view, not just storage
        if key not in cast_of:
            cast_of[key] = value.to(dtype)
        out[name] = cast_of[key]
    return out


def save_student(
    model,
    tokenizer,
    recipe: Recipe,
    summary: dict,
    folder: Path,
    state_dict: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """The final student: save_pretrained + tokenizer + recipe.yaml + summary.json, moved into place whole.

    `state_dict` replaces the model's own weights (gathered FSDP shards); weights are written in `dtype`, and
    config.json says so (save_pretrained would record the in-memory float32)."""
    tmp = atomic.fresh_tmp_folder(folder)
    state = _cast_state(state_dict if state_dict is not None else model.state_dict(), dtype)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    atomic.write_json(tmp / "config.json", config)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    atomic.write_json(tmp / "summary.json", summary)
    atomic.replace_folder(tmp, folder)
