"""The whole evaluation (`distill eval`, the end-of-run report): every model against the teacher on the same data.

Reads top to bottom: which models -> the eval data -> load and cost each model -> score it beside the teacher ->
the report dict (the report.json contract) -> report.json/.md/.html.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.data import Example, build_examples, pad_id_of
from distill.errors import DistillError
from distill.losses.fused import DEFAULT_MEMORY_BUDGET_BYTES
from distill.models import (
    DTYPES,
    check_vocabulary,
    compare_tokenizers,
    count_parameters,
    embedding_rows,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    pick_device,
    resolve_dtype,
)
from distill.report.difficulty import bucket_index, bucket_metrics, by_difficulty, difficulty_edges
from distill.report.draft import DraftSettings, draft_skip_reason, measure_draft
from distill.report.failures import FailureSettings, greedy_failures, length_ratio
from distill.report.generation import eval_prompts, exact_match, read_generation_rows
from distill.report.quality import counted_bytes, score_pass, summarize
from distill.report.retention import retention_of, speedup_of
from distill.report.speed import SpeedSettings, measure_speed, model_device, size_on_disk
from distill.report.tasks import DEFINITION as TASKS_DEFINITION
from distill.report.tasks import TaskSuite, prepare_tasks, run_tasks, task_report
from distill.sampling import eos_ids


@dataclass
class ModelSpec:
    """Where a model comes from and where it runs. `dtype`: auto | float32 | bfloat16 | float16."""

    name: str
    path: str
    dtype: str = "auto"
    device: str | None = None


def _spec(name: str, value, dtype: str, device: str | None) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, dict):
        if "path" not in value:
            raise DistillError(f"model {name}: needs a path")
        return ModelSpec(name, str(value["path"]), value.get("dtype", dtype), value.get("device", device))
    return ModelSpec(name, str(value), dtype, device)


def parse_model_arguments(students: Sequence[str] = (), baselines: Sequence[str] = ()) -> dict[str, str]:
    """`--student DIR` / `--student NAME=DIR` / `--baseline DIR` values -> {name: path}, in the order given.

    A value is NAME=DIR when it holds "=", is not itself an existing path, and NAME is a plain name; a bare DIR
    is named "student" (or "baseline"). Names must be unique and not "teacher"."""
    models: dict[str, str] = {}
    for default, values in (("student", students), ("baseline", baselines)):
        for value in values:
            name, path = default, value
            head, sep, tail = value.partition("=")
            if sep and not Path(value).exists() and head.replace("-", "_").replace(".", "_").isidentifier():
                name, path = head, tail
            if not path:
                raise DistillError(f"--{default} {value}: give a model folder")
            if name in models or name == "teacher":
                raise DistillError(f"model name {name!r} given twice or reserved; use --student NAME=DIR")
            models[name] = path
    if not models:
        raise DistillError("distill eval: give at least one --student DIR")
    return models


DEFINITIONS = {
    "cross_entropy": "mean over counted target tokens of −log p_model(target), nats per token",
    "perplexity": "exp(cross_entropy)",
    "bits_per_byte": "total cross-entropy in bits (sum of nats / ln 2) divided by the UTF-8 bytes of the counted "
    "target tokens' text; each run of consecutive targets ids[a:b] contributes "
    "len(utf8(decode(ids[:b]))) − len(utf8(decode(ids[:a]))), special tokens decoded to nothing",
    "top1_accuracy": "share of counted tokens where the model's argmax equals the target token",
    "agreement": "share of counted tokens where the model's argmax equals the teacher's argmax",
    "kl_to_teacher": "mean over counted tokens of KL(teacher ‖ model) at temperature 1, nats",
    "counted_tokens": "targets whose label is not -100, exactly as in training: prompt tokens and padding excluded; "
    "output position i predicts input token i+1",
    "retention": "higher-is-better metric m: m_model / m_teacher; cross_entropy and bits_per_byte: "
    "teacher / model (1.0 = 100% = as good as the teacher)",
    "speedup": "decode: model decode tok/s ÷ teacher decode tok/s at batch 1; params: teacher params ÷ model params",
    "prefill_tokens_per_s": "batch 1: prompt tokens ÷ seconds of one forward over a random prompt with the KV "
    "cache on; median of the timed runs after warm-up",
    "decode_tokens_per_s": "batch 1: generated tokens ÷ seconds of a fixed-length greedy loop feeding "
    "past_key_values back (no early stop); median of the timed runs after warm-up",
    "peak_memory_bytes": "weights in memory (exact) + peak extra memory of the largest-batch timing run: "
    "CUDA max_memory_allocated above the start, or on CPU sampled RSS above the start (approximate)",
    "size_on_disk_bytes": "sum of the weight files (.safetensors, .bin, ...) in the model folder",
    "exact_match": "greedy decoding from the prompt; stripped, whitespace-collapsed output equals the answer",
    "tasks": TASKS_DEFINITION,
    "draft_acceptance_rate": "the model as the teacher's draft in greedy assisted generation (transformers, batch 1, "
    "draft.draft_tokens proposed per round) on draft.prompts eval prompts: accepted ÷ proposed draft tokens, as "
    "counted by transformers' own candidate generator",
    "speculative_decode_speedup": "tokens/s of the teacher with this draft ÷ tokens/s of the teacher alone, greedy, "
    "batch 1, the same prompts and new tokens (wall time, alternating order)",
    "by_difficulty": "counted tokens split at the quartiles of the teacher's entropy −Σ p log p (nats, temperature "
    "1; bucket 1 = the most certain quarter, ties to the lower bucket); each model's metrics on the same tokens, "
    "retention against the teacher's same bucket",
    "failure_modes": "greedy generations of failure_modes.generations eval prompts (up to max_new_tokens): "
    "repeated_ngram_share = n-grams already seen earlier in their generation ÷ all n-grams (rep-n); looping_share "
    "= generations not ended by EOS whose last max(2p, 2n) tokens repeat one block of p ≤ 16 tokens; "
    "mean_generated_tokens before EOS and its ratio to the teacher's; expected_calibration_error of the top-1 "
    "prediction on the counted eval tokens, 15 equal-width confidence bins",
}


def _free_memory(device: torch.device, large: bool) -> None:
    """Return a dropped model's memory before the next one loads. A full garbage collection (modules hold
    reference cycles) costs about a second in a big process, so small CPU models skip it."""
    if large or device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _EvalData:
    """The held-out data as every model sees it: tokenized once with the teacher's tokenizer."""

    tokenizer: object
    examples: list[Example]
    rows_read: int
    truncated_rows: int
    max_length: int | None  # None: no model states a context length, nothing was cut
    counted_bytes: int
    pad_id: int
    generation_rows: list[dict] | None
    prompt_limit: int  # exact match keeps a prompt's last tokens
    generation_extra_tokens: int
    draft_settings: DraftSettings | None = None  # None: drafts not measured (draft_off says why)
    draft_off: str | None = None
    draft_prompts: list[list[int]] | None = None
    failure_settings: FailureSettings | None = None
    failure_prompts: list[list[int]] | None = None
    section_s: dict | None = None  # seconds spent on the draft and failure-mode generations
    tasks: TaskSuite | None = None  # lm-eval tasks run on every model (report.tasks)


def evaluate_models(
    teacher_dir: str | dict,
    models: dict[str, str | dict],
    data: str,
    out_dir: str | None,
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    max_rows: int | None = None,
    generation: str | None = None,
    generation_extra_tokens: int = 16,
    metrics_path: str | None = None,
    speed: bool = True,
    speed_settings: SpeedSettings | None = None,
    device: str | None = None,
    dtype: str = "auto",
    show_progress: bool = True,
    log=print,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    draft: bool = True,
    draft_settings: DraftSettings | None = None,
    failure_settings: FailureSettings | None = None,
    tasks: Sequence[str] = (),
    tasks_limit: int | None = None,
    cross_tokenizer: bool = False,
) -> dict:
    """Evaluate the teacher and every model on the same held-out data; write the report into `out_dir`.

    `teacher_dir` is a folder or hub id (or {"path", "dtype", "device"}); `models` maps a name ("student",
    "baseline", or any NAME) to a folder or hub id, or to {"path", "dtype", "device"} to run that model in
    another dtype or on another device than the teacher. Models are loaded one at a time beside the teacher
    (memory: teacher + one model); the teacher's logits are recomputed for each.

    `data` is read and tokenized exactly as training reads eval data (`build_examples`, truncation to
    `max_length`; None, the default: to the shortest context length of the models, so pre-tokenized rows such as
    a run's `eval-data.jsonl` are evaluated whole); `max_rows` keeps the first that many examples. `generation`
    is an optional prompt/answer file for exact match. `metrics_path` (or `out_dir/metrics.jsonl`) gives training
    curves. `speed=False` skips timing (its keys are then null); `speed_settings` sets runs and tokens
    (`SpeedSettings.quick()`). `device` defaults to cuda when available; `dtype` (auto | float32 | bfloat16 |
    float16) applies to every model without its own. Returns the report dict (the report.json contract plus
    extra keys) and writes report.json/.md/.html and PNGs into `out_dir` (None: writes nothing). User mistakes
    raise DistillError. Metrics come from hidden states, `memory_budget_bytes` of float32 logits at a time.

    `draft` measures every model as the teacher's speculative-decoding draft (`DraftSettings`: prompts, lengths;
    only with `speed`, as it times the teacher with and without the draft);
    `failure_settings` sets the greedy generations behind the failure modes (prompts=0: none, calibration only).
    `tasks` (lm-eval names or task YAML files, `tasks_limit` documents each) run on every model: report["tasks"].
    `cross_tokenizer`: models may have other tokenizers than the teacher's; each is scored on its own tokenization
    and compared on bits per byte and where spans align (`distill.report.cross`; no draft, tasks, generations).
    """
    teacher_spec, specs = _model_specs(teacher_dir, models, dtype, device)
    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise DistillError("eval needs batch_size >= 1 and max_length >= 2")
    if max_length is None:
        max_length = _shortest_context((teacher_spec, *specs))
    if cross_tokenizer:
        from distill.report.cross import evaluate_across_tokenizers

        speed_across = (speed_settings or SpeedSettings()) if speed else None
        return evaluate_across_tokenizers(
            teacher_spec,
            specs,
            data,
            out_dir,
            max_length=max_length,
            batch_size=batch_size,
            max_rows=max_rows,
            speed_settings=speed_across,
            log=log,
            metrics_path=metrics_path,
        )
    evaluation = _eval_data(teacher_spec, specs, data, max_length, max_rows, generation, generation_extra_tokens, log)
    # The draft check is a timing too (teacher with and without the draft): off with the other timings.
    draft_off = "report.draft is off" if not draft else None if speed else "timing is off (report.speed, --no-speed)"
    _judging_prompts(evaluation, None if draft_off else draft_settings or DraftSettings(), failure_settings, draft_off)
    evaluation.tasks = prepare_tasks(tasks, tasks_limit, batch_size)  # checked before any model runs
    settings = (speed_settings or SpeedSettings()) if speed else None

    teacher = _load(teacher_spec)
    vocab_size = check_vocabulary(evaluation.tokenizer, teacher, None)
    examples = evaluation.examples
    log(f"eval data: {len(examples)} sequences, {sum(e.loss_tokens for e in examples)} counted tokens")
    teacher_cost = _cost(teacher, teacher_spec, vocab_size, evaluation, settings, log)
    teacher_quality, results, difficulty = _score_models(
        teacher, specs, evaluation, vocab_size, batch_size, settings, show_progress, log, memory_budget_bytes
    )
    report = _report({"teacher": {**teacher_quality, **teacher_cost}, **results}, evaluation, data, generation)
    report["by_difficulty"] = difficulty
    if evaluation.tasks is not None:
        report["tasks"] = task_report(report["models"])
    if out_dir is not None:
        from distill.report.render import write_report

        write_report(report, out_dir, metrics_path)
        log(f"report written to {Path(out_dir) / 'report.html'}")
    return report


def _model_specs(
    teacher_dir: str | dict, models: dict[str, str | dict], dtype: str, device: str | None
) -> tuple[ModelSpec, list[ModelSpec]]:
    """The teacher's and every model's spec, each model's dtype and device defaulting to the shared ones."""
    default_device = str(pick_device(device, "--device"))
    teacher_spec = _spec("teacher", teacher_dir, dtype, default_device)
    specs = []
    for name, value in models.items():
        if not name or name == "teacher" or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise DistillError(f"model name {name!r} is not allowed (use letters, digits, - and _; not 'teacher')")
        specs.append(_spec(name, value, dtype, default_device))
    return teacher_spec, specs


def _shortest_context(specs: Sequence[ModelSpec]) -> int | None:
    """The shortest context length the models state (None: none states one).

    Truncating to a fixed default would silently cut rows tokenized for a longer context (a run's
    eval-data.jsonl holds rows of the recipe's data.max_length); only what no model can read is cut."""
    contexts = [max_context(load_config(s.path, s.name)) for s in specs]
    known = [c for c in contexts if c is not None]
    return min(known) if known else None


def _eval_data(
    teacher_spec: ModelSpec,
    specs: Sequence[ModelSpec],
    data: str,
    max_length: int | None,
    max_rows: int | None,
    generation: str | None,
    generation_extra_tokens: int,
    log,
) -> _EvalData:
    """The eval set tokenized with the teacher's tokenizer, after checking every model's tokenizer matches it."""
    tokenizer = load_tokenizer(teacher_spec.path, "teacher")
    for spec in specs:
        if has_tokenizer(spec.path):
            difference = compare_tokenizers(tokenizer, load_tokenizer(spec.path, spec.name))
            if difference is not None:
                raise DistillError(
                    f"teacher and {spec.name} tokenizers differ ({difference.replace('student', spec.name)}); "
                    "--cross-tokenizer compares them on bits per byte"
                )
    examples, stats = build_examples(data, tokenizer, max_length if max_length is not None else sys.maxsize)
    if stats.truncated_rows:
        log(f"eval data: {stats.truncated_rows} rows cut to {max_length} tokens")
    if max_rows is not None:
        examples = examples[:max_rows]
    if not examples:
        raise DistillError(f"eval data {data}: no examples with loss tokens ({stats.rows} rows read)")
    return _EvalData(
        tokenizer=tokenizer,
        examples=examples,
        rows_read=stats.rows,
        truncated_rows=stats.truncated_rows,
        max_length=max_length,
        counted_bytes=counted_bytes(examples, tokenizer),
        pad_id=pad_id_of(tokenizer),
        generation_rows=read_generation_rows(generation) if generation else None,
        prompt_limit=max_length if max_length is not None else sys.maxsize,
        generation_extra_tokens=generation_extra_tokens,
    )


def _judging_prompts(
    evaluation: _EvalData, draft: DraftSettings | None, failures: FailureSettings | None, draft_off: str | None
) -> None:
    """The eval prompts the draft measurement and the failure-mode generations continue (the same for every model);
    `draft_off` says why drafts are not measured (None: they are)."""
    evaluation.draft_off = draft_off
    failures = failures or FailureSettings()
    evaluation.failure_settings = failures
    evaluation.failure_prompts = eval_prompts(evaluation.examples, failures.prompts, failures.prompt_tokens)
    evaluation.draft_settings = draft
    if draft is not None:
        evaluation.draft_prompts = eval_prompts(evaluation.examples, draft.prompts, draft.prompt_tokens)
    evaluation.section_s = {"draft": 0.0, "failure_generations": 0.0}


def _load(spec: ModelSpec):
    """The model of `spec` in eval mode, frozen, on its device and in its dtype."""
    dev = pick_device(spec.device, f"{spec.name} device")
    if spec.dtype != "auto" and spec.dtype not in DTYPES:
        raise DistillError(f"{spec.name} dtype {spec.dtype!r}: choose auto, {', '.join(DTYPES)}")
    model = load_model(spec.path, spec.name, resolve_dtype(spec.dtype, dev))
    model.eval()
    model.requires_grad_(False)
    return model.to(dev)


def _cost(model, spec: ModelSpec, vocab_size: int, evaluation: _EvalData, settings: SpeedSettings | None, log) -> dict:
    """Size, speed (None `settings`: not timed, its keys null) and exact match of one model."""
    result = {
        "params": count_parameters(model),
        "size_on_disk_bytes": size_on_disk(spec.path),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model_device(model)),
        "path": spec.path,
    }
    if settings is not None:
        log(f"timing {spec.name} ({result['device']}, {result['dtype']})")
        measured = measure_speed(model, vocab_size, settings)
        batch_1 = measured["batches"][0]
        result.update(
            prefill_tokens_per_s=batch_1["prefill_tokens_per_s"],
            decode_tokens_per_s=batch_1["decode_tokens_per_s"],
            peak_memory_bytes=measured["peak_memory_bytes"],
            weights_memory_bytes=measured["weights_memory_bytes"],
            speed=measured,
        )
    else:
        result.update(prefill_tokens_per_s=None, decode_tokens_per_s=None, peak_memory_bytes=None)
    start = time.perf_counter()
    result["failure_modes"] = greedy_failures(
        model,
        evaluation.failure_prompts,
        eos_ids(model, evaluation.tokenizer),
        evaluation.pad_id,
        vocab_size,
        evaluation.failure_settings,
    )
    evaluation.section_s["failure_generations"] += time.perf_counter() - start
    if evaluation.tasks is not None:
        result["tasks"] = run_tasks(model, evaluation.tokenizer, evaluation.tasks, spec.name, log)
    if evaluation.generation_rows is not None:
        result.update(
            exact_match(
                model,
                evaluation.tokenizer,
                evaluation.generation_rows,
                evaluation.prompt_limit,
                evaluation.generation_extra_tokens,
            )
        )
    return result


def _draft(teacher, model, name: str, evaluation: _EvalData, vocab_size: int, log) -> dict:
    """`measure_draft` of `model` for the teacher, or null keys and a note saying why it was not measured."""
    settings, prompts = evaluation.draft_settings, evaluation.draft_prompts
    reason = evaluation.draft_off if settings is None else draft_skip_reason(teacher, model)
    if reason is None and not prompts:
        reason = "no eval prompts"
    if reason is None:
        log(f"{name} as the teacher's draft ({len(prompts)} prompts x {settings.new_tokens} tokens)")
        start = time.perf_counter()
        eos = eos_ids(teacher, evaluation.tokenizer)
        try:
            return measure_draft(teacher, model, prompts, eos, evaluation.pad_id, vocab_size, settings)
        except ValueError as error:  # transformers refuses the pair (an architecture without a croppable cache...)
            reason = f"transformers refused assisted generation: {error}"
        finally:
            evaluation.section_s["draft"] += time.perf_counter() - start
    return {"draft_acceptance_rate": None, "speculative_decode_speedup": None, "draft_note": f"not measured: {reason}"}


class _Difficulty:
    """The difficulty buckets, fixed by the teacher's entropies from the first pass; every model's tokens are placed
    in the same buckets (the passes' counted tokens are checked to be the same, in the same order)."""

    def __init__(self, teacher_part):
        self.teacher = teacher_part.tensors()
        self.edges = difficulty_edges(self.teacher["teacher_entropy"])
        self.index = bucket_index(self.teacher["teacher_entropy"], self.edges) if self.edges else None
        self.buckets = {"teacher": bucket_metrics(self.teacher, self.index)} if self.edges else {}

    def add(self, name: str, collected) -> None:
        if not self.edges:
            return
        tokens = collected.tensors()
        for key in ("example", "position"):
            if not torch.equal(tokens[key], self.teacher[key]):
                raise RuntimeError("eval passes disagree on the counted tokens; cannot split them by difficulty")
        self.buckets[name] = bucket_metrics(tokens, self.index)

    def report(self) -> dict:
        return by_difficulty(self.buckets, self.edges) if self.edges else {}


def _score_models(
    teacher,
    specs: Sequence[ModelSpec],
    evaluation: _EvalData,
    vocab_size: int,
    batch_size: int,
    settings: SpeedSettings | None,
    show_progress: bool,
    log,
    memory_budget_bytes: int,
) -> tuple[dict, dict[str, dict], dict]:
    """The teacher's quality, each model's quality, cost and draft results (one model at a time beside the teacher),
    and `by_difficulty`.

    The teacher's own results come from the first pass (with no models: a teacher-only pass); so do the teacher's
    per-token entropies that place every model's tokens in the same difficulty buckets."""
    examples, tokenizer = evaluation.examples, evaluation.tokenizer
    results: dict[str, dict] = {}
    teacher_quality = difficulty = None
    progress = _progress(show_progress)
    with progress or contextlib.nullcontext():
        for spec in specs or [None]:
            model = _load(spec) if spec is not None else None
            if model is not None and embedding_rows(model) < vocab_size:
                raise DistillError(
                    f"{spec.name} has {embedding_rows(model)} output rows but the tokenizer has {vocab_size} tokens"
                )
            name = spec.name if spec is not None else "teacher"
            teacher_part, model_part = score_pass(
                teacher,
                model,
                examples,
                batch_size,
                evaluation.pad_id,
                vocab_size,
                progress,
                f"eval {name}",
                teacher_quality is None,
                memory_budget_bytes,
            )
            if teacher_quality is None:
                teacher_quality = summarize(teacher_part, evaluation.counted_bytes, examples, tokenizer)
                difficulty = _Difficulty(teacher_part)
                del teacher_part
            if model is not None:
                quality = summarize(model_part, evaluation.counted_bytes, examples, tokenizer)
                difficulty.add(spec.name, model_part)
                results[spec.name] = {
                    **quality,
                    **_cost(model, spec, vocab_size, evaluation, settings, log),
                    **_draft(teacher, model, spec.name, evaluation, vocab_size, log),
                }
                device_used, large = model_device(model), count_parameters(model) > 50_000_000
                del model, model_part
                _free_memory(device_used, large)
    return teacher_quality, results, difficulty.report()


def _report(report_models: dict[str, dict], evaluation: _EvalData, data: str, generation: str | None) -> dict:
    """The report dict (the report.json contract in DESIGN.md): every model, retention and speed-up, the data."""
    teacher_result = report_models["teacher"]
    others = {name: r for name, r in report_models.items() if name != "teacher"}
    for r in report_models.values():  # the generations' signals beside calibration on the eval tokens
        failures = r.setdefault("failure_modes", {})
        failures["expected_calibration_error"] = r.pop("expected_calibration_error", None)
        failures["length_ratio_to_teacher"] = length_ratio(failures, teacher_result.get("failure_modes"))
    return {
        "models": report_models,
        "retention": {name: retention_of(r, teacher_result) for name, r in others.items()},
        "speedup": {name: speedup_of(r, teacher_result) for name, r in others.items()},
        "data": {
            "path": str(data),
            "sequences": len(evaluation.examples),
            "counted_tokens": teacher_result["tokens"],
            "counted_bytes": evaluation.counted_bytes,
            "max_length": evaluation.max_length,
            "rows_read": evaluation.rows_read,
            "truncated_rows": evaluation.truncated_rows,
            "generation": str(generation) if generation else None,
            "draft_prompts": len(evaluation.draft_prompts or []),
            "failure_prompts": len(evaluation.failure_prompts or []),
        },
        "section_time_s": {k: round(v, 3) for k, v in (evaluation.section_s or {}).items()},
        "definitions": DEFINITIONS,
    }


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
