"""LoRA students (`student.lora`): a PEFT adapter is trained instead of all the student's weights.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes every weight W of the student
and learns, for each adapted linear layer, W + (alpha / r) · B A with A (r, in) and B (out, r); B starts at zero,
so the adapted student starts exactly where its base is. Only A and B get gradients, AdamW moments and room in the
checkpoints; the frozen base is rebuilt from where it came from on resume (student.path, or the pruned init the run
folder keeps in `student-init/`).

What a run leaves: `student/`, the adapter merged into the weights (a plain transformers model, no peft needed), and
`adapter/`, which loads with `PeftModel.from_pretrained(base, run/adapter)` on that same base.

Self-distillation (`student.path` == `teacher.path`, with an adapter): the teacher *is* the student's base, so one
copy of the weights is kept and the teacher pass runs the student with its adapter disabled (`BaseView`).

peft is an optional dependency (extra `[peft]`), imported only when a recipe asks for an adapter.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from distill import atomic
from distill.config import LoraConfig, Recipe
from distill.errors import DistillError
from distill.models import count_parameters

ADAPTER = "default"  # PEFT's name of the one adapter a run trains
_PREFIX = "base_model.model."  # what a PeftModel puts before the transformers model's own parameter names


def _peft():
    try:
        import peft
    except ImportError:
        raise DistillError("recipe key student.lora: needs the peft package: pip install 'distill[peft]'") from None
    return peft


def is_lora(model) -> bool:
    """Whether `model` is a PeftModel (without importing peft when no recipe asked for it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_adapter(student: torch.nn.Module, spec: LoraConfig, seed: int, log=print):
    """The student wrapped in a fresh LoRA adapter (a PeftModel): base weights frozen, A and B trainable.

    A's random start is drawn from `seed` in a forked RNG: the same on every rank and whatever ran before, and the
    training RNG streams (dropout, sampling) are left as they were.
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question (is_gradient_checkpointing): not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            model = peft.get_peft_model(student, config)
        except ValueError as e:  # "Target modules {...} not found in the base model ..."
            raise DistillError(f"recipe key student.lora.target_modules: {str(e).splitlines()[0]}") from None
    _check_adapted_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = count_parameters(model) - trainable
    layers = sum(1 for _ in _lora_layers(model))
    log(
        f"LoRA r={spec.r}, alpha={spec.alpha:g}: {trainable / 1e6:.3f}M trainable parameters in {layers} layers "
        f"({100 * trainable / max(base, 1):.2f}% of the student's {base / 1e6:.2f}M, which stay frozen)"
    )
    return model


def _lora_layers(model):
    """(name, layer) of every adapted layer, names as `model.named_modules()` gives them."""
    from peft.tuners.lora import LoraLayer

    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer))


def _check_adapted_layers(model) -> None:
    """Refuse adapters that distill cannot merge or that the fused loss would not see."""
    from peft.tuners.lora import Linear

    head = model.get_output_embeddings()
    for name, layer in _lora_layers(model):
        if layer is head:
            # The fused loss reads the head's weight directly, outside the layer's forward, so an adapter there
            # would be silently ignored in training.
            raise DistillError(
                f"recipe key student.lora.target_modules: {name.removeprefix(_PREFIX)} is the output head, "
                "which cannot take an adapter here; leave it out (all-linear does)"
            )
        if not isinstance(layer, Linear):
            raise DistillError(
                f"recipe key student.lora.target_modules: {name.removeprefix(_PREFIX)} is a "
                f"{type(layer.get_base_layer()).__name__}; only linear layers take an adapter here"
            )


# ---------------------------------------------------------------- self-distillation


def shares_teacher(recipe: Recipe) -> bool:
    """Self-distillation: an adapter on the teacher's own weights, run online (the teacher is the student's base)."""
    s, t = recipe.student, recipe.teacher
    if s.lora is None or s.path is None or t.path is None or t.cache is not None:
        return False
    if (s.revision, s.trust_remote_code) != (t.revision, t.trust_remote_code):
        return False
    if os.path.exists(s.path) and os.path.exists(t.path):
        return os.path.samefile(s.path, t.path)
    return s.path == t.path


class BaseView:
    """The student's base weights seen as the teacher: every call runs the student with its adapter disabled.

    Not a copy: attribute reads (parameters(), config, get_output_embeddings(), ...) are the student's own, so the
    teacher costs no memory. Calls of the view, and of its decoder (`get_decoder()`, which the fused loss and the
    evaluation call directly), run inside the PeftModel's `disable_adapter()`, in eval mode (no dropout).
    """

    def __init__(self, student, target=None):
        self._student = student
        self._target = student if target is None else target

    def __call__(self, *args, **kwargs):
        was_training = self._student.training
        self._student.eval()  # a teacher runs without dropout, whatever mode the student trains in
        try:
            with self._student.disable_adapter():
                return self._target(*args, **kwargs)
        finally:
            self._student.train(was_training)

    def get_decoder(self):
        return BaseView(self._student, self._target.get_decoder())

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_student", "_target"):  # copy/pickle probes before __init__ ran
            raise AttributeError(name)
        return getattr(self._target, name)


def is_base_view(model) -> bool:
    return isinstance(model, BaseView)


# ---------------------------------------------------------------- saving


def merged_state(model, state: dict[str, torch.Tensor] | None = None):
    """(the transformers model inside the PeftModel `model`, its weights with the adapter merged in).

    `state` is the PeftModel's whole state dict (gathered FSDP shards) or None for the model's own. Each adapted
    weight becomes W + (B A) · alpha / r (transposed for fan-in-fan-out layers, as PEFT merges), computed in float32;
    the adapter's own tensors are dropped and the rest keep transformers' names, so the result saves as a plain model.
    """
    state = model.state_dict() if state is None else state
    merged_weights = {}
    for name, layer in _lora_layers(model):
        a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]  # (r, in), (out, r)
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]  # (out, in)
        if layer.fan_in_fan_out:
            delta = delta.T  # Conv1D-style layers store (in, out)
        weight = state[f"{name}.base_layer.weight"]
        merged_weights[f"{name}.base_layer.weight"] = (weight.float() + delta).to(weight.dtype)
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if not key.startswith(_PREFIX):
            raise ValueError(f"unexpected key {key} in a PeftModel state dict")
        out[key.removeprefix(_PREFIX).replace(".base_layer.", ".")] = merged_weights.get(key, value)
    return model.get_base_model(), out


def base_location(recipe: Recipe, out: Path) -> str:
    """Where the adapter's base lives: student.path, or the pruned init the run folder keeps (student.from_teacher)."""
    source = str(out / "student-init") if recipe.student.from_teacher is not None else recipe.student.path
    return str(Path(source).resolve()) if os.path.exists(source) else source


def save_adapter(model, folder: Path, base: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """`adapter/`: PEFT's adapter_config.json + adapter_model.safetensors (float32), moved into place whole.

    `state`: the PeftModel's whole state dict (gathered FSDP shards), or None for the model's own weights.
    """
    tmp = atomic.fresh_tmp_folder(folder)
    model.peft_config[ADAPTER].base_model_name_or_path = base
    # save_embedding_layers=False: "auto" would look the base up (on the hub when the name is not a local folder).
    model.save_pretrained(tmp, state_dict=state, save_embedding_layers=False, safe_serialization=True)
    atomic.replace_folder(tmp, folder)


def summary_fields(model, teacher, base: str) -> dict:
    """summary.json of a LoRA run: the student's size as saved (merged), the adapter's size and settings."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.peft_config[ADAPTER]
    fields = {
        "student_params": count_parameters(model) - trainable,
        "trainable_params": trainable,
        "adapter": {
            "r": config.r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "adapted_layers": sum(1 for _ in _lora_layers(model)),
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in _lora_layers(model)}),
            "base": base,
        },
    }
    if is_base_view(teacher):
        fields["teacher_params"] = fields["student_params"]
        fields["self_distillation"] = True
    return fields
