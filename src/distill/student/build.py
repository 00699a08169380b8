"""Build a student by pruning the teacher (Minitron-style structured pruning), ready for distillation.

    resolve_target(config, layers=..., params=...)   -> the student's transformers config
    build_student(teacher_dir, out_dir, ...)          -> writes a plain Hugging Face model folder

Depth: keep the N layers whose removal changes the teacher's distributions least, measured as the KL to the teacher
on calibration data (`distill.student.depth`), or by block influence (ShortGPT, Men et al. 2024), or spread uniformly.
Width: keep the most
important embedding channels, MLP neurons and attention heads (Minitron, Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"), scored on calibration data, or by weight magnitude without it.
The mechanics live beside it in `distill.student`; this file reads top to bottom: plan -> load -> score -> cut -> save.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from distill.atomic import fresh_tmp_folder, replace_folder, write_json
from distill.errors import DistillError
from distill.models import DTYPES, pick_device
from distill.student.architecture import EMBED_SCALED
from distill.student.depth import CalibrationKL, search_layers
from distill.student.importance import activation_importance, weight_importance
from distill.student.slicing import layers_by_influence, rescale_for_hidden, select, slice_state
from distill.student.target import Shape, Spec, config_diff, solve_shape, student_config, uniform_layers

# How depth pruning picks layers (the recipe's student.from_teacher.layer_selection, `--layer-selection`).
LAYER_SELECTIONS = ("kl", "influence", "uniform")
# The first release called block influence "importance"; recipes written then keep working.
_LAYER_SELECTION_ALIASES = {"importance": "influence"}


def resolve_target(config, *, layers=None, params=None, hidden_size=None, intermediate_size=None, heads=None):
    """The student's config: the teacher's `config` with the requested sizes, the rest solved from `params`.

    `params` is a share of the teacher ("0.25x") or a count ("20M", "1.5B", an int); see `distill.student.target`
    for how a budget becomes sizes. `layer_types` follows a uniform choice of layers here; `build_student` redoes
    it for the layers it actually keeps. Raises DistillError for targets the teacher cannot give.
    """
    spec, shape = _plan(config, layers, params, hidden_size, intermediate_size, heads)
    return student_config(spec, shape, uniform_layers(spec.shape.layers, shape.layers))


def build_student(
    teacher_dir,
    out_dir,
    *,
    layers: int | None = None,
    params: str | int | float | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    heads: int | None = None,
    calibration=None,
    layer_selection: str = "kl",
    max_calibration_tokens: int = 8192,
    search_tokens: int = 2048,
    layer_search: str = "auto",
    calibration_max_length: int = 512,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    log=print,
) -> dict:
    """Prune the teacher in `teacher_dir` into a student written to `out_dir`; returns a summary dict.

    `calibration`: a data file `distill.data.build_examples` reads; with it, width is ranked by activations (up to
    `max_calibration_tokens` tokens) and layers as `layer_selection` says: "kl" (default) searches the subset with the
    lowest KL to the teacher on the first `search_tokens` calibration tokens (`layer_search`: auto | exhaustive |
    greedy, see `distill.student.depth`), "influence" keeps the layers of largest block influence, "uniform" spreads
    them evenly (first and last kept). Without calibration data, layers are uniform and width is ranked by weight
    magnitude. `out_dir` gets save_pretrained (safetensors) + the teacher's tokenizer + pruning.json, atomically.
    """
    out_dir = Path(out_dir)
    layer_selection = _check_layer_selection(layer_selection)
    if layer_search not in ("auto", "exhaustive", "greedy"):
        raise DistillError(f"layer_search={layer_search!r}: expected auto, exhaustive or greedy")
    _refuse_non_empty(out_dir)
    config = _load_config(teacher_dir, trust_remote_code)
    spec, shape = _plan(config, layers, params, hidden_size, intermediate_size, heads)
    teacher_params, student_params = spec.count(spec.shape), spec.count(shape)
    log(_describe(config.model_type, spec.shape, shape, teacher_params, student_params))
    if params is not None:
        log(_explain_split(spec, shape, params))

    tokenizer = _load_tokenizer(teacher_dir, trust_remote_code, required=calibration is not None)
    teacher = _load_teacher(teacher_dir, dtype, trust_remote_code)
    search = None
    if calibration is not None:
        device = pick_device(device, "device")
        examples = _calibration_examples(calibration, tokenizer, calibration_max_length)
        with _measuring_dtype(teacher.to(device)):
            importance = activation_importance(teacher, examples, max_calibration_tokens, spec.head_dim)
            log(f"importance measured on {importance.tokens} calibration tokens")
            if layer_selection == "kl" and shape.layers < spec.shape.layers:
                search = _search_by_kl(teacher, examples, shape.layers, search_tokens, layer_search, log)
    else:
        importance = weight_importance(teacher.state_dict(), config, spec.head_dim)

    if search is not None:
        kept_layers = search["kept"]
    else:
        kept_layers = _choose_layers(spec.shape.layers, shape.layers, layer_selection, importance.block_influence, log)
    selection = select(importance, kept_layers, spec.shape, shape)
    student_cfg = student_config(spec, shape, kept_layers)
    student, rescale = _assemble(teacher, student_cfg, selection, spec, trust_remote_code)
    if (actual := sum(p.numel() for p in student.parameters())) != student_params:
        raise RuntimeError(f"student has {actual} parameters, the plan said {student_params}")  # a bug, not input

    record = {
        "teacher": str(teacher_dir),
        "model_type": config.model_type,
        "teacher_params": teacher_params,
        "student_params": student_params,
        "importance": importance.source,
        "layer_selection": layer_selection if importance.block_influence is not None else "uniform",
        "layer_search": search,
        "calibration": {"source": str(calibration), "tokens": importance.tokens} if calibration is not None else None,
        "kept_layers": kept_layers,
        "block_influence": importance.block_influence,
        "kept_hidden_channels": _kept_or_all(selection.hidden, spec.shape.hidden),
        "kept_neurons": [_kept_or_all(n, spec.shape.intermediate) for n in selection.neurons],
        "kept_heads": [_kept_or_all(h, spec.shape.heads) for h in selection.heads],
        "kept_kv_heads": [_kept_or_all(h, spec.shape.kv_heads) for h in selection.kv_heads],
        "hidden_rescale": rescale,
        "config_diff": config_diff(config, student_cfg),
        "notes": _notes(config.model_type, rescale),
    }
    _write(out_dir, student, tokenizer, record)
    log(f"student written to {out_dir}")
    return {
        "out_dir": str(out_dir),
        "teacher_params": teacher_params,
        "student_params": student_params,
        "kept_layers": kept_layers,
        "config_diff": record["config_diff"],
        "importance": importance.source,
        "block_influence": importance.block_influence,
        "layer_search": search,
    }


# ---------------------------------------------------------------- plan


def _plan(config, layers, params, hidden_size, intermediate_size, heads) -> tuple[Spec, Shape]:
    if all(v is None for v in (layers, params, hidden_size, intermediate_size, heads)):
        raise DistillError("say how small the student is: layers, params, hidden_size, intermediate_size or heads")
    spec = Spec.from_config(config)
    shape = solve_shape(
        spec, layers=layers, params=params, hidden_size=hidden_size, intermediate_size=intermediate_size, heads=heads
    )
    return spec, shape


def _describe(model_type: str, t: Shape, s: Shape, teacher_params: int, student_params: int) -> str:
    def change(name, a, b):
        return f"{name} {a}" if a == b else f"{name} {a} -> {b}"

    parts = [
        change("layers", t.layers, s.layers),
        change("hidden", t.hidden, s.hidden),
        change("intermediate", t.intermediate, s.intermediate),
        change("heads", f"{t.heads}/{t.kv_heads}kv", f"{s.heads}/{s.kv_heads}kv"),
    ]
    ratio = student_params / teacher_params
    return f"student ({model_type}): {', '.join(parts)}; params {teacher_params:,} -> {student_params:,} ({ratio:.3f}x)"


def _check_layer_selection(how: str) -> str:
    how = _LAYER_SELECTION_ALIASES.get(how, how)
    if how not in LAYER_SELECTIONS:
        raise DistillError(f"layer_selection={how!r}: expected one of {', '.join(LAYER_SELECTIONS)}")
    return how


def _explain_split(spec: Spec, shape: Shape, params) -> str:
    """One line on how a parameter budget was split between depth and width, and why (Minitron)."""
    t = spec.shape
    full_depth = Shape(t.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads)
    by_width = spec.count(t) - spec.count(full_depth)
    by_depth = spec.count(full_depth) - spec.count(shape)
    removed = max(by_width + by_depth, 1)
    width = f"hidden {t.hidden} -> {shape.hidden}, intermediate {t.intermediate} -> {shape.intermediate}"
    depth = f"layers {t.layers} -> {shape.layers}" if shape.layers != t.layers else f"all {t.layers} layers"
    split = (
        f"width removes {by_width:,} parameters ({by_width / removed:.0%}), "
        f"depth {by_depth:,} ({by_depth / removed:.0%})"
    )
    if shape.layers == t.layers:
        why = "all layers kept: width pruning keeps more accuracy than depth pruning at moderate ratios (Minitron)"
    else:
        why = (
            f"width first (it keeps more accuracy, Minitron) down to about half the teacher's; the rest by dropping "
            f"{t.layers - shape.layers} of {t.layers} layers (depth buys more speed: each layer is a sequential step)"
        )
    return f"params {params}: {width}, {depth}; {split}; {why}"


def _choose_layers(teacher_layers: int, keep: int, how: str, block_influence, log) -> list[int]:
    if keep == teacher_layers:
        return list(range(teacher_layers))
    if how != "uniform" and block_influence is not None:
        return layers_by_influence(block_influence, keep)
    if how != "uniform":
        log("no calibration data: keeping layers spread uniformly (first and last included)")
    return uniform_layers(teacher_layers, keep)


def _search_by_kl(teacher, examples, keep: int, search_tokens: int, how: str, log) -> dict:
    """The `keep` layers with the lowest calibration KL to the teacher; the record pruning.json keeps of the search."""
    start = time.perf_counter()
    score = CalibrationKL(teacher, examples, search_tokens)
    found = search_layers(score, teacher.config.num_hidden_layers, keep, how)
    seconds = time.perf_counter() - start
    log(
        f"layers {found.kept} kept by KL to the teacher ({found.method} search): calibration KL {found.kl:.4f} nats on "
        f"{score.tokens} tokens, {found.passes} forward passes ({found.layer_forwards} layer forwards), {seconds:.1f} s"
    )
    return {
        "kept": found.kept,
        "method": found.method,
        "calibration_kl": found.kl,
        "tokens": score.tokens,
        "forward_passes": found.passes,
        "layer_forwards": found.layer_forwards,
        "seconds": round(seconds, 3),
        "rounds": found.rounds,
    }


@contextmanager
def _measuring_dtype(teacher):
    """Measure in float32 on a CPU: its half-precision matmuls are several times slower (bfloat16 5x on the demo
    teacher) and less exact. The cast back to the stored dtype is exact, so the student's weights are unchanged."""
    dtype = teacher.dtype
    upcast = dtype in (torch.bfloat16, torch.float16) and next(teacher.parameters()).device.type == "cpu"
    if upcast:
        teacher.float()
    try:
        yield
    finally:
        if upcast:
            teacher.to(dtype)


# ---------------------------------------------------------------- load


def _load_config(teacher_dir, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(teacher_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read the teacher config at {teacher_dir}: {_one_line(e)}") from None


def _load_tokenizer(teacher_dir, trust_remote_code: bool, required: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(teacher_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if required:
            raise DistillError(f"calibration needs the teacher's tokenizer: {_one_line(e)}") from None
        return None


def _load_teacher(teacher_dir, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise DistillError(f"dtype={dtype!r}: expected auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(teacher_dir), use_safetensors=True, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        ).eval()
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot load the teacher from {teacher_dir}: {_one_line(e)}") from None


def _calibration_examples(source, tokenizer, max_length: int) -> list[list[int]]:
    from distill.data import build_examples

    # Packed blocks: every calibration token is a real token (no padding) and lengths are even.
    examples, _ = build_examples(source, tokenizer, max_length, packing=True)
    if not examples:
        raise DistillError(f"calibration data {source} gave no tokens")
    return [e.input_ids for e in examples]


# ---------------------------------------------------------------- cut and save


def _assemble(teacher, student_cfg, selection, spec: Spec, trust_remote_code: bool):
    """A fresh model from the student config, filled with the teacher's weights cut to the selection."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(student_cfg, dtype=teacher.dtype, trust_remote_code=trust_remote_code)
    state = slice_state(teacher.state_dict(), list(student.state_dict()), selection, spec.head_dim)
    output, embed = student.get_output_embeddings(), student.get_input_embeddings()
    tied = output is not None and output.weight is embed.weight
    rescale = rescale_for_hidden(state, student_cfg, spec.shape.hidden, tied)
    student.load_state_dict(state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config
    return student.eval(), rescale


def _kept_or_all(kept: list[int], total: int):
    return "all" if len(kept) == total else kept


def _notes(model_type: str, rescale: float) -> list[str]:
    if rescale == 1.0:
        return []
    notes = [
        f"hidden size shrank: residual-stream RMSNorm scales were multiplied by {rescale:.6g} = sqrt(H_teacher / "
        "H_student) so kept channels are normalized as if the dropped ones were zero"
    ]
    if model_type in EMBED_SCALED:
        notes.append(
            f"{model_type} multiplies embeddings by sqrt(hidden_size): the embedding matrix was multiplied by "
            f"{rescale:.6g} to keep the teacher's input scale (with tied embeddings the final norm is left as it was)"
        )
    return notes


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DistillError(f"output folder {out_dir} already exists and is not empty")


def _write(out_dir: Path, student, tokenizer, record: dict) -> None:
    """save_pretrained + tokenizer + pruning.json into a temporary folder, then one rename."""
    _refuse_non_empty(out_dir)
    tmp = fresh_tmp_folder(out_dir)
    try:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "pruning.json", record)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
