"""Set-up of a training run, everything before the first step: accelerator, run folder, models, data, the teacher's
signal, the student's loss module (DDP / FSDP2 around it), the optimizer and the state a resume restores.

`set_up` returns them as one `Run`; the loop (`distill.train.loop.train`) only reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import atomic
from distill.config import Recipe
from distill.data import data_fingerprint, load_data, pad_id_of
from distill.errors import DistillError
from distill.losses.heads import output_head
from distill.models import (
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
)
from distill.train.checkpoint import RunState, list_checkpoints, load_checkpoint, set_rng_state
from distill.train.parallel import load_full_state_dicts, pick_strategy, shard_student, shard_teacher
from distill.train.step import StudentLoss

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
class Run:
    """What the loop works on, built once by `set_up`."""

    models: Models
    train_examples: list
    eval_examples: list
    teacher_signal: object  # None (online teacher or none) or a cache reader
    loss_module: torch.nn.Module  # a StudentLoss, possibly wrapped by DDP or sharded by FSDP2
    optimizer: object  # accelerate's wrapper (or the AdamW itself under FSDP)
    torch_optimizer: torch.optim.Optimizer  # the real AdamW: its state dict is checkpointed
    state: RunState
    strategy: str  # 'single', 'ddp' or 'fsdp'
    world: int
    rank: int
    per_rank: int  # sequences per process and step
    micro: int  # sequences per micro-batch
    pad_id: int


def set_up(recipe: Recipe, accelerator, out: Path, checkpoint: Path | None, log) -> Run:
    """Models, data, loss module, optimizer and (from `checkpoint`) the resumed state, in the order a run needs."""
    t = recipe.training
    student_init = build_student_init(recipe, out, log)
    world, rank = accelerator.num_processes, accelerator.process_index
    strategy = pick_strategy(t.distributed, world)
    # Under FSDP the teacher reaches the device only as shards: a teacher larger than one device still loads.
    shards_teacher = strategy == "fsdp" and t.shard_teacher
    teacher_device = torch.device("cpu") if shards_teacher else accelerator.device
    models = load_models(recipe, accelerator.device, student_init, log, teacher_device)
    train_examples, eval_examples = load_data(recipe, models.tokenizer, log)
    teacher_signal = open_teacher_signal(recipe, models, train_examples)
    if recipe.objective.fused:
        check_fused_heads(models, train_examples[0].input_ids[:16])

    per_rank = t.batch_size // world
    if per_rank * world != t.batch_size or per_rank % t.grad_accum:
        raise DistillError(
            f"recipe key training.batch_size: {t.batch_size} does not split into {world} processes "
            f"× {t.grad_accum} micro-batches"
        )
    if strategy == "fsdp" and accelerator.mixed_precision == "fp16":
        raise DistillError("training.mixed_precision=fp16 does not work with training.distributed=fsdp; use bf16")
    if world > 1:
        log(f"{world} processes, {strategy.upper()}; {per_rank} sequences per process and step")
    if shards_teacher and models.teacher is not None:
        shard_teacher(models.teacher, accelerator.device)
    teacher_head = None
    if recipe.objective.fused and models.teacher is not None:
        teacher_head = output_head(models.teacher)
    models.student.train()  # the plain Hugging Face model: evaluation, sampling and saving use it
    loss_module = StudentLoss(models.student, recipe.objective, models.vocab_size, teacher_head)
    if strategy == "fsdp":
        shard_student(loss_module, accelerator.mixed_precision)  # before the optimizer: it sees the shards
    optimizer = torch.optim.AdamW(
        parameter_groups(loss_module, t.weight_decay),
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
        state = resume_state(checkpoint, loss_module, torch_optimizer, world, rank, accelerator.is_main_process)
        if state.data_fingerprint and state.data_fingerprint != fingerprint:
            raise DistillError(
                f"--resume: the training examples differ from the checkpoint's (data.train {recipe.data.train} "
                "was changed or rewritten since the run started); start a new run in another output.dir"
            )
        log(f"resumed from {checkpoint} (step {state.step})")
    state.data_fingerprint = fingerprint
    return Run(
        models=models,
        train_examples=train_examples,
        eval_examples=eval_examples,
        teacher_signal=teacher_signal,
        loss_module=loss_module,
        optimizer=optimizer,
        torch_optimizer=torch_optimizer,
        state=state,
        strategy=strategy,
        world=world,
        rank=rank,
        per_rank=per_rank,
        micro=per_rank // t.grad_accum,
        pad_id=pad_id_of(models.tokenizer),
    )


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


def prepare_output(recipe: Recipe, resume: bool) -> tuple[Path, Path | None]:
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


def build_student_init(recipe: Recipe, out: Path, log) -> Path | None:
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


def open_teacher_signal(recipe: Recipe, models: Models, train_examples):
    """Where the teacher's distributions come from: None (online teacher or no teacher) or a cache reader,
    checked against this tokenizer and this list of training examples."""
    if recipe.teacher.cache is None or not recipe.needs_teacher:
        return None
    from distill.cache.reader import open_cache_for_training

    return open_cache_for_training(recipe, models.tokenizer, train_examples, models.vocab_size)


def check_fused_heads(models: Models, ids: list[int]) -> None:
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


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norms."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_state(checkpoint: Path, loss_module, optimizer, world: int, rank: int, is_main: bool) -> RunState:
    """Restore weights, AdamW moments and this rank's RNG state; only rank 0 reads the tensors (it broadcasts)."""
    saved = load_checkpoint(checkpoint, tensors=is_main)
    load_full_state_dicts(loss_module, optimizer, saved.model, saved.optimizer, world)
    # A run resumed with another number of processes reuses the saved states in turn.
    set_rng_state(*saved.rng[rank % len(saved.rng)])
    return saved.state
