"""The student's sizes: given explicitly, or solved from a parameter budget.

Rule for `params` (what is not given explicitly), following Minitron (Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"), which found width pruning better than depth pruning at moderate
ratios and attention-head pruning the most harmful axis:

1. Attention heads are never chosen automatically (give `heads` to prune them).
2. Width first: hidden and MLP intermediate size shrink by one common factor (their ratio is kept), with all layers,
   down to half the teacher's width (WIDTH_FLOOR). The size whose parameter count is closest to the budget wins.
3. Only if half width with every layer is still over budget are layers removed: the most layers that fit at half
   width, then the width is solved again for that depth (closest count, never below half width).
4. Sizes chosen here are multiples of 8 (64 for dimensions of 1024 or more); the hidden size is also a multiple of
   the head count, which transformers checks for Llama-family configs. head_dim never changes.

Parameter counts are exact: they come from the teacher's own parameter shapes (built on the meta device, no memory)
with the pruned axes resized, so the tied lm_head counts once, biases and extra norms are included.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from distill.errors import DistillError
from distill.student.architecture import axes_of, check_supported, split_name

WIDTH_FLOOR = 0.5

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Shape:
    """The sizes that pruning changes. `kv_heads` follows from `heads` by the GQA rule in `resolve_heads`."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


@dataclass
class Spec:
    """What pruning needs to know about a teacher: its config, sizes and every parameter's shape and axes."""

    config: object
    shape: Shape
    head_dim: int
    # (layer or None, name inside the layer or top-level name, axes, teacher shape); layer 0 stands for every layer.
    params: list[tuple[int | None, str, tuple[str, ...], tuple[int, ...]]]

    @classmethod
    def from_config(cls, config) -> Spec:
        from transformers import AutoModelForCausalLM

        # The meta device gives every shape without allocating memory, even for a 70B config.
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise DistillError(f"cannot build a causal LM from this config: {e}".splitlines()[0]) from None
        named = list(model.named_parameters())  # tied weights listed once, as they are stored once
        check_supported(
            config, [n for n, _ in named] + [n for n, _ in model.named_buffers() if n in model.state_dict()]
        )
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv_heads)
        params = []
        for name, p in named:
            layer, rest = split_name(name)
            if layer is None or layer == 0:
                params.append((layer, rest, axes_of(name), tuple(p.shape)))
        return cls(config, shape, head_dim, params)

    def count(self, shape: Shape) -> int:
        """Exact parameter count of the student with these sizes (all layers have the same parameters)."""
        size = {
            "hidden": shape.hidden,
            "inter": shape.intermediate,
            "q": shape.heads * self.head_dim,
            "kv": shape.kv_heads * self.head_dim,
        }
        total = 0
        for layer, _, axes, teacher_shape in self.params:
            dims = [size.get(kind, n) for kind, n in zip(axes, teacher_shape, strict=True)]
            total += math.prod(dims) * (shape.layers if layer is not None else 1)
        return total


def parse_params(params: str | int | float, teacher_params: int) -> int:
    """A budget as a parameter count. "0.25x" (or a bare number below 1) is a share of the teacher;
    "20M", "1.5B", "300k" or an integer are absolute counts."""
    text = str(params).strip().lower().replace("_", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([xkmbgt]?)", text)
    if not match:
        raise DistillError(f"params {params!r}: expected a share like 0.25x or a count like 20M, 1.5B")
    value, suffix = float(match.group(1)), match.group(2)
    share = suffix == "x" or (not suffix and value < 1)
    count = value * teacher_params if share else value * _SUFFIX.get(suffix, 1)
    if count <= 0:
        raise DistillError(f"params {params!r}: the budget must be positive")
    if round(count) > teacher_params:
        raise DistillError(f"params {params!r} is {_human(count)}, more than the teacher's {_human(teacher_params)}")
    return round(count)


def resolve_heads(teacher: Shape, heads: int | None) -> tuple[int, int]:
    """(query heads, KV heads) of the student under grouped-query attention.

    Query heads share a KV head in groups of `teacher.heads // teacher.kv_heads`. If `heads` is a multiple of the
    number of KV heads, every KV head stays and each group loses the same number of query heads (KV heads are few
    and cheap, and Minitron keeps them). Otherwise whole groups go (query heads together with their KV head),
    which needs `heads` to be a multiple of the group size.
    """
    if heads is None or heads == teacher.heads:
        return teacher.heads, teacher.kv_heads
    group = teacher.heads // teacher.kv_heads
    if not 1 <= heads <= teacher.heads:
        raise DistillError(f"heads={heads}: must be between 1 and the teacher's {teacher.heads}")
    if heads % teacher.kv_heads == 0:
        return heads, teacher.kv_heads
    if heads % group == 0:
        return heads, heads // group
    raise DistillError(
        f"heads={heads} does not fit grouped-query attention: the teacher has {teacher.heads} query heads in "
        f"{teacher.kv_heads} KV groups of {group}; use a multiple of {teacher.kv_heads} (thinner groups) "
        f"or of {group} (fewer groups)"
    )


def _step(teacher_size: int) -> int:
    # Multiples of 64 keep matmuls efficient on accelerators; small test models would lose too much at 64.
    return 64 if teacher_size >= 1024 else 8


def _round_to(value: float, step: int, maximum: int) -> int:
    return int(min(maximum, max(step, step * round(value / step))))


def _width_options(spec: Spec, hidden: int | None, intermediate: int | None, heads: int, floor: float):
    """(hidden, intermediate) pairs, smallest first, for the sizes not given; at least `floor` of the teacher."""
    t = spec.shape
    if hidden is None:
        step = math.lcm(_step(t.hidden), heads)
        sizes = sorted({*range(step, t.hidden + 1, step), t.hidden})
        sizes = [h for h in sizes if h >= floor * t.hidden] or [sizes[-1]]
        step_i = _step(t.intermediate)

        def matching(h: int) -> int:
            # The MLP shrinks with the hidden size so the teacher's intermediate/hidden ratio is kept.
            return _round_to(t.intermediate * h / t.hidden, step_i, t.intermediate)

        return [(h, intermediate if intermediate is not None else matching(h)) for h in sizes]
    if intermediate is None:
        step = _step(t.intermediate)
        sizes = sorted({*range(step, t.intermediate + 1, step), t.intermediate})
        sizes = [i for i in sizes if i >= floor * t.intermediate] or [sizes[-1]]
        return [(hidden, i) for i in sizes]
    return [(hidden, intermediate)]


def solve_shape(
    spec: Spec,
    *,
    layers: int | None,
    params: str | int | float | None,
    hidden_size: int | None,
    intermediate_size: int | None,
    heads: int | None,
) -> Shape:
    """The student's sizes: explicit values kept, the rest solved from `params` by the rule in the module docstring."""
    t = spec.shape
    _check_within(t, layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size)
    heads, kv_heads = resolve_heads(t, heads)
    if params is None:
        return Shape(layers or t.layers, hidden_size or t.hidden, intermediate_size or t.intermediate, heads, kv_heads)

    budget = parse_params(params, spec.count(t))
    if layers is not None and hidden_size is not None and intermediate_size is not None:
        raise DistillError("params cannot be met when layers, hidden_size and intermediate_size are all given")

    def shape(n_layers: int, width: tuple[int, int]) -> Shape:
        return Shape(n_layers, width[0], width[1], heads, kv_heads)

    def closest(n_layers: int, options) -> Shape:
        # Ties go to the larger student.
        return min((shape(n_layers, w) for w in options), key=lambda s: (abs(spec.count(s) - budget), -spec.count(s)))

    depth_free = layers is None
    options = _width_options(spec, hidden_size, intermediate_size, heads, WIDTH_FLOOR if depth_free else 0.0)
    full_depth = layers or t.layers
    smallest = shape(full_depth, options[0])
    if spec.count(smallest) <= budget:
        return closest(full_depth, options)
    if not depth_free:
        _raise_unreachable(spec, budget, smallest, params)
    fitting = [n for n in range(1, t.layers + 1) if spec.count(shape(n, options[0])) <= budget]
    if not fitting:
        _raise_unreachable(spec, budget, shape(1, options[0]), params)
    return closest(max(fitting), options)


def _raise_unreachable(spec: Spec, budget: int, smallest: Shape, params) -> None:
    raise DistillError(
        f"params {params!r} ({_human(budget)}) is below the smallest student this rule allows "
        f"({_human(spec.count(smallest))} with {smallest.layers} layers, hidden {smallest.hidden}, "
        f"intermediate {smallest.intermediate}); give hidden_size/intermediate_size/layers explicitly"
    )


def _check_within(t: Shape, *, layers, hidden_size, intermediate_size) -> None:
    for key, value, limit in (
        ("layers", layers, t.layers),
        ("hidden_size", hidden_size, t.hidden),
        ("intermediate_size", intermediate_size, t.intermediate),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistillError(f"{key}={value!r}: expected a whole number")
        if not 1 <= value <= limit:
            raise DistillError(f"{key}={value}: must be between 1 and the teacher's {limit}")


def uniform_layers(teacher_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over the teacher, always the first and the last (when keep >= 2)."""
    if keep == 1:
        return [0]
    return [math.floor(i * (teacher_layers - 1) / (keep - 1) + 0.5) for i in range(keep)]


def student_config(spec: Spec, shape: Shape, kept_layers: list[int]):
    """The teacher's config with the pruned sizes; per-layer lists (layer_types) follow the kept layers."""
    teacher = spec.config
    values = teacher.to_dict()
    values.update(
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        # Written out so a smaller hidden size cannot change the derived hidden_size // heads default.
        head_dim=spec.head_dim,
    )
    if values.get("layer_types") is not None:
        # Sliding-window vs full attention belongs to each layer; dropped layers take their type with them.
        values["layer_types"] = [values["layer_types"][i] for i in kept_layers]
    if isinstance(values.get("max_window_layers"), int):
        values["max_window_layers"] = sum(1 for i in kept_layers if i < values["max_window_layers"])
    try:
        return type(teacher).from_dict(values)
    except _config_errors() as e:
        raise DistillError(f"invalid student config: {' '.join(str(e).split())}") from None


def _config_errors() -> tuple[type[Exception], ...]:
    # transformers 5 validates configs through huggingface_hub's strict dataclasses, which raise their own type.
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub with transformers 4.x
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def config_diff(teacher, student) -> dict[str, list]:
    """{key: [teacher value, student value]} for every config entry that differs."""
    a, b = teacher.to_dict(), student.to_dict()
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(round(count))
