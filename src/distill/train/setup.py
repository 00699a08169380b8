"""Set-up of a training run, everything before the first step: accelerator, run folder, models, data, the teacher's
signal, the student's loss module (DDP / FSDP2 around it), the optimizer and the state a resume restores.

`set_up` returns them as one `Run`; the loop (`distill.train.loop.train`) only reads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import atomic
from distill.config import Recipe
from distill.data import data_fingerprint, load_data, pad_id_of
from distill.errors import DistillError
from distill.losses.heads import OutputHead, backbone, output_head
from distill.models import (
    Models,
    attn_implementation,
    check_vocabulary,
    compare_tokenizers,
    count_parameters,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    new_model_from_config,
    pick_device,
    teacher_dtype,
)
from distill.train.checkpoint import RunState, list_checkpoints, load_checkpoint, set_rng_state
from distill.train.cross import check_recipe as check_cross_recipe
from distill.train.cross import cross_objective, open_cross_cache_signal, open_cross_tokenizer
from distill.train.lora import BaseView, add_adapter, is_base_view, shares_teacher
from distill.train.parallel import load_full_state_dicts, pick_strategy, shard_student, shard_teacher
from distill.train.step import StudentLoss, hidden_layer_pairs
from distill.train.teachers import check_recipe as check_teachers_recipe
from distill.train.teachers import models_view, open_teachers

# Recipe sections whose change makes a checkpoint meaningless for this run.
_RESUME_SENSITIVE = ("teacher", "teachers", "student", "data", "objective")
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
    teacher_signal: object  # None (online teacher or none), a cache reader or a served teacher (ServedSignal)
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
    cross: object = None  # a TokenizerPair across tokenizers (objective.cross_tokenizer), else None


def set_up(recipe: Recipe, accelerator, out: Path, checkpoint: Path | None, log) -> Run:
    """Models, data, loss module, optimizer and (from `checkpoint`) the resumed state, in the order a run needs."""
    t = recipe.training
    check_cross_recipe(recipe)  # objective.cross_tokenizer: what it cannot do yet, before any model loads
    student_init = build_student_init(recipe, out, log)
    world, rank = accelerator.num_processes, accelerator.process_index
    strategy = pick_strategy(t.distributed, world)
    check_teachers_recipe(recipe, world)  # recipe key teachers: what several teachers cannot do
    # Under FSDP the teacher reaches the device only as shards: a teacher larger than one device still loads.
    shards_teacher = strategy == "fsdp" and t.shard_teacher
    teacher_device = pick_teacher_device(recipe, accelerator, shards_teacher)
    # Several teachers (recipe key teachers): the student and tokenizer here, each teacher in `open_teachers`.
    models = load_models(
        models_view(recipe) if recipe.teachers else recipe, accelerator.device, student_init, log, teacher_device
    )
    train_examples, eval_examples = load_data(recipe, models.tokenizer, log)
    if recipe.teachers:
        teacher_signal = open_teachers(recipe, models, train_examples, accelerator.device, log)
        teacher_heads(teacher_signal, models, recipe.objective.fused, train_examples[0].input_ids[:16])
    else:
        teacher_signal = open_teacher_signal(recipe, models, train_examples, log)
    cross = open_cross_tokenizer(recipe, models, train_examples, log)  # None unless objective.cross_tokenizer
    teacher_signal = open_cross_cache_signal(recipe, cross, train_examples) or teacher_signal  # from a cache
    if recipe.objective.fused:
        probe = train_examples[0].input_ids[:16]
        check_fused_heads(models, probe, cross.align(probe).teacher_ids[:16] if cross is not None else None)
    apply_model_settings(recipe, models, log)  # after the head check: its eval-mode forwards would compile twice

    per_rank = t.batch_size // world
    if per_rank * world != t.batch_size or per_rank % t.grad_accum:
        raise DistillError(
            f"recipe key training.batch_size: {t.batch_size} does not split into {world} processes "
            f"× {t.grad_accum} micro-batches"
        )
    if strategy == "fsdp" and accelerator.mixed_precision == "fp16":
        raise DistillError("training.mixed_precision=fp16 does not work with training.distributed=fsdp; use bf16")
    if world > 1 or strategy == "fsdp":
        log(f"{world} processes, {strategy.upper()}; {per_rank} sequences per process and step")
    # A teacher that is the student's own base (LoRA self-distillation) is sharded with the student and has its head.
    own_teacher = is_base_view(models.teacher)
    if shards_teacher and models.teacher is not None and not own_teacher:
        shard_teacher(models.teacher, accelerator.device)
    teacher_head = None
    if recipe.objective.fused and models.teacher is not None and not own_teacher:
        # A teacher on another device (teacher.device) lends the loss a copy of its head where the student is.
        teacher_head = head_on(output_head(models.teacher), accelerator.device)
    models.student.train()  # the plain Hugging Face model: evaluation, sampling and saving use it
    pairs, teacher_width = hidden_layer_pairs(recipe, models, log)  # objective.hidden: [] when off
    loss_module = StudentLoss(
        models.student,
        recipe.objective,
        models.vocab_size,
        teacher_head,
        pairs,
        teacher_width,
        seed=t.seed,
        cross=cross_objective(cross, recipe.objective.cross_tokenizer, accelerator.device),
    )
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
        cross=cross,
    )


def pick_accelerator(recipe: Recipe, log_with: list | None = None):
    """accelerate's Accelerator for the recipe's device and precision; `log_with`: its experiment trackers."""
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
    cpu = device == "cpu" or (device == "auto" and no_accelerator)
    return Accelerator(cpu=cpu, mixed_precision=precision, log_with=log_with or None)


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
    # A served teacher (teacher.endpoint) runs elsewhere: teacher.path then only names its tokenizer (and the report's).
    use_teacher = recipe.needs_teacher and t.path is not None and t.cache is None and t.endpoint is None
    teacher_config = None
    if t.path is not None:
        teacher_config = load_config(t.path, "teacher", t.trust_remote_code, t.revision)
        _check_context(recipe, teacher_config, "teacher")
    student_source = str(student_init) if student_init is not None else s.path
    if student_source is not None:
        _check_context(recipe, load_config(student_source, "student", s.trust_remote_code, s.revision), "student")

    # Across tokenizers (objective.cross_tokenizer) the student keeps its own; the teacher's is loaded beside it.
    cross = recipe.objective.cross_tokenizer != "off" and recipe.needs_teacher
    own = student_source if cross and student_source is not None and _has_own_tokenizer(student_source) else None
    tokenizer_source = s.tokenizer or own or t.path or _cached_tokenizer(t.cache) or student_source
    if tokenizer_source == t.path:
        tokenizer = load_tokenizer(t.path, "teacher", t.trust_remote_code, t.revision)
    else:
        tokenizer = load_tokenizer(tokenizer_source, "student", s.trust_remote_code, s.revision)
    # The student's own tokenizer must agree with the one whose ids the teacher (or its cache) speaks.
    teacher_side = t.path is not None or t.cache is not None or t.endpoint is not None
    own_tokenizer = student_source is not None and student_source != tokenizer_source and has_tokenizer(student_source)
    if teacher_side and own_tokenizer and not cross:
        difference = compare_tokenizers(tokenizer, load_tokenizer(student_source, "student", s.trust_remote_code))
        if difference is not None:
            raise DistillError(
                f"teacher and student tokenizers differ ({difference}); logit distillation needs one tokenizer"
            )

    # The teacher computes where teacher.device says; under FSDP (auto) it loads on CPU but runs sharded on `device`.
    teacher_runs_on = teacher_device if teacher_device is not None and t.device != "auto" else device
    student_attn = attn_implementation(s.attn_implementation, device, "recipe key student.attn_implementation")
    teacher_attn = attn_implementation(t.attn_implementation, teacher_runs_on, "recipe key teacher.attn_implementation")
    if student_source is not None:
        student = load_model(
            student_source, "student", torch.float32, s.trust_remote_code, s.revision, attn_implementation=student_attn
        )
    else:
        seed = recipe.training.seed
        student = new_model_from_config(s.config, len(tokenizer), torch.float32, seed, tokenizer, student_attn)
        _check_context(recipe, student.config, "student")
    if s.lora is not None:
        student = add_adapter(student, s.lora, recipe.training.seed, log)
    teacher = None
    if use_teacher and s.lora is not None and shares_teacher(recipe):
        # Self-distillation: the teacher is the student's own base; one copy, run with the adapter disabled.
        teacher = BaseView(student)
        log("self-distillation: the teacher is the student's base weights (one copy; adapter disabled for it)")
    elif use_teacher:
        dtype = teacher_dtype(t.dtype, teacher_runs_on)
        if t.dtype == "auto" and dtype == torch.bfloat16 and teacher_runs_on.type == "cpu":
            log("teacher in bfloat16 (teacher.dtype auto: this CPU has native bf16; teacher.dtype=float32 keeps fp32)")
        attn = teacher_attn
        teacher = load_model(t.path, "teacher", dtype, t.trust_remote_code, t.revision, attn_implementation=attn)
        teacher.eval()
        teacher.requires_grad_(False)
        teacher.to(teacher_device or device)
    vocab_size = check_vocabulary(tokenizer, None if cross else teacher, student)
    log(
        f"student: {count_parameters(student) / 1e6:.2f}M parameters"
        + (f"; teacher: {count_parameters(teacher) / 1e6:.2f}M parameters" if teacher is not None else "")
        + f"; vocabulary: {vocab_size} tokens"
    )
    return Models(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=vocab_size)


def _has_own_tokenizer(source: str) -> bool:
    """A local folder with tokenizer files, or a hub id (whose repository is assumed to hold one)."""
    return has_tokenizer(source) or not Path(source).expanduser().exists()


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


def open_teacher_signal(recipe: Recipe, models: Models, train_examples, log=print):
    """Where the teacher's distributions come from: None (online teacher or no teacher), a cache reader checked
    against this tokenizer and this list of training examples, or the server at teacher.endpoint."""
    if not recipe.needs_teacher:
        return None
    if recipe.teacher.cache is None and recipe.teacher.endpoint is not None:
        from distill.train.served import ServedSignal

        return ServedSignal(recipe, models.tokenizer, train_examples, models.vocab_size, log)
    if recipe.teacher.cache is None or recipe.objective.cross_tokenizer != "off":  # across: opened with the pair
        return None
    from distill.cache.reader import open_cache_for_training

    return open_cache_for_training(recipe, models.tokenizer, train_examples, models.vocab_size)


def teacher_heads(teachers, models: Models, fused: bool, probe: list[int]) -> None:
    """Several teachers, fused path: each online teacher's head checked and lent to the loss where the student is."""
    for t in teachers.teachers:
        if fused and t.model is not None:
            check_fused_heads(dataclasses.replace(models, teacher=t.model), probe)
            device = next(models.student.parameters()).device
            t.head = head_on(output_head(t.model), device)


def pick_teacher_device(recipe: Recipe, accelerator, shards_teacher: bool) -> torch.device:
    """Where the teacher is loaded: teacher.device, or (auto) the training device; CPU while FSDP shards it."""
    requested = recipe.teacher.device
    if shards_teacher:
        if requested != "auto":
            raise DistillError(
                f"recipe key teacher.device: {requested} cannot be honoured while training.shard_teacher=true "
                "spreads the teacher over the processes' devices; set training.shard_teacher=false to place it"
            )
        return torch.device("cpu")
    if requested == "auto":
        return accelerator.device
    return pick_device(requested, key="recipe key teacher.device", local_rank=accelerator.local_process_index)


def head_on(head: OutputHead, device: torch.device) -> OutputHead:
    """`head` with its weight (and bias) on `device`: a copy when the teacher lives elsewhere, else itself."""
    if head.weight.device == device:
        return head
    bias = head.bias.to(device) if head.bias is not None else None
    return dataclasses.replace(head, weight=head.weight.to(device), bias=bias)


def apply_model_settings(recipe: Recipe, models: Models, log) -> None:
    """training.gradient_checkpointing on the student, training.compile on both models' decoder layers."""
    t = recipe.training
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(models.student, selective=t.gradient_checkpointing == "selective")
    if t.compile:
        compiled = compile_layers(models.student)
        # The student's own base as the teacher (LoRA self-distillation) shares the layers just compiled.
        if models.teacher is not None and not is_base_view(models.teacher):
            compiled += compile_layers(models.teacher)
        log(f"torch.compile: {compiled} decoder layers (compiled at their first step)")


def enable_gradient_checkpointing(model: torch.nn.Module, selective: bool = False) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    `selective` (training.gradient_checkpointing: selective) keeps what matrix products and attention return and
    recomputes only the elementwise work between them (norms, rotary, activations, GQA's repeated keys): on the
    SmolLM2-135M-shaped student over 8 x 256 tokens the forward keeps 754 instead of 1436 MiB for about 4% more
    backward time, with bitwise the same gradients (`distill.train.recompute`).

    Non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False): it needs no input that requires
    grad (a frozen embedding or a LoRA base works), works under DDP and FSDP2, and restores the RNG state, so
    dropout draws the same mask twice. Transformers applies it inside each layer's __call__, which is what the fused
    loss's backbone call (`distill.losses.heads.backbone_hidden_states`) goes through as well.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DistillError(
            f"recipe key training.gradient_checkpointing: {type(model).__name__} does not support it; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if selective:
        from distill.train.recompute import keep_products_only

        kwargs["context_fn"] = keep_products_only
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile the compute of each decoder layer (its attention and MLP blocks); returns how many layers.

    Layer by layer, as torchtune and torchtitan do, so that compile time does not grow with depth and module hooks
    (FSDP2's gathering, DDP's) stay outside compiled code. Inside each layer it is the blocks that hold matrices
    (attention, MLP), not the layer's own forward: transformers 5 wraps every layer class's forward in one shared
    checkpointing function, and one code object for all layers of teacher and student (train, eval, no-grad
    variants) overruns dynamo's recompile limit, after which it silently runs eager. The blocks' forwards are their
    classes' own code, and the checkpointing wrapper and the norms stay eager around them. `forward` is replaced in
    place (no wrapper module), so parameter names and checkpoints are unchanged. Without declared layer classes the
    backbone's forward is compiled whole.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        block = backbone(model)
        block.forward = torch.compile(block.forward, dynamic=True)
        return 1
    for layer in layers:
        for block in layer.children():
            if any(p.ndim >= 2 for p in block.parameters()):  # attention and MLP; norms stay eager
                # dynamic: sequence lengths change from batch to batch; one graph instead of one per length.
                block.forward = torch.compile(block.forward, dynamic=True)
    return len(layers)


def check_fused_heads(models: Models, ids: list[int], teacher_ids: list[int] | None = None) -> None:
    """Fail before training when the fused path would not see the logits the model itself produces.

    `teacher_ids`: the teacher's own ids of the probe when it has another tokenizer (objective.cross_tokenizer)."""
    from distill.losses.heads import verify_output_head

    for role, model in (("student", models.student), ("teacher", models.teacher)):
        if model is None:
            continue
        if role == "teacher" and teacher_ids is not None:
            ids = teacher_ids or [0]
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
        if not p.requires_grad:  # a LoRA student's frozen base: no update, no AdamW moments
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_state(checkpoint: Path, loss_module, optimizer, world: int, rank: int, is_main: bool) -> RunState:
    """Restore weights, AdamW moments and this rank's RNG state; only rank 0 reads the tensors (it broadcasts)."""
    saved = load_checkpoint(checkpoint, tensors=is_main)
    load_full_state_dicts(loss_module, optimizer, saved.model, saved.optimizer, world)
    # A run resumed with another number of processes reuses the saved states in turn.
    set_rng_state(*saved.rng[rank % len(saved.rng)])
    return saved.state
