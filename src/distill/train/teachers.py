"""Several teachers in one run (recipe key `teachers`: name -> a teacher section, instead of `teacher`).

Routing. Each row names its teacher in `data.teacher_field` (read into `Example.teacher` by `distill.data`; the key
is not trained on). A micro-batch may mix teachers: its rows are split by teacher, each group's loss sums are
computed against that teacher's own signal (run here, read from its cache, or asked of its server) and added up.
The normalizer stays the global batch's loss-token count, so a step's loss is the same sum over every loss token
divided by the same count whatever the mix, and 8 micro-batches × 1 still equal 1 × 8. On-policy, the student
samples the row's prompt and the row's teacher scores the sample.

A teacher's cache (`teachers.NAME.cache`) holds exactly the training rows that name it, in order: build it with
`distill cache` from a single-teacher recipe whose data.train holds those rows.

Memory: every online teacher is loaded once and kept for the whole run (N online teachers cost the sum of their
weights beside the student); a micro-batch runs only the teachers its rows name, one after another, on their own
rows, so activations peak as with one teacher over the whole micro-batch. Cached and served teachers cost no
weights here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill import atomic
from distill.config import Recipe, TeacherConfig
from distill.errors import DistillError
from distill.models import (
    Models,
    check_vocabulary,
    compare_tokenizers,
    load_model,
    load_tokenizer,
    pick_device,
    teacher_dtype,
)
from distill.train.served import ServedSignal


def check_recipe(recipe: Recipe, world: int) -> None:
    """What several teachers cannot be combined with, refused with one line naming the key, before models load."""
    if not recipe.teachers:
        if recipe.teachers is not None:
            raise DistillError("recipe key teachers: name at least one teacher (name: {path | cache | endpoint})")
        return
    t = recipe.teacher
    if t.path is not None or t.cache is not None or t.endpoint is not None:
        raise DistillError("recipe key teachers: give either teacher or teachers, not both")
    for name, section in recipe.teachers.items():
        if section.path is None and section.cache is None and section.endpoint is None:
            raise DistillError(f"recipe key teachers.{name}: give its path, cache or endpoint")
        if recipe.objective.on_policy.lambda_ > 0 and section.cache is not None:
            raise DistillError(
                f"recipe key teachers.{name}.cache: on-policy steps need every teacher to score the student's "
                "samples (path or endpoint, no cache); set objective.on_policy.lambda=0"
            )
    o, s = recipe.objective, recipe.student
    refused = [
        (recipe.data.packing, "data.packing", "a packed block would mix rows of several teachers"),
        (o.hidden.weight > 0, "objective.hidden.weight", "hidden-state distillation takes one teacher"),
        (o.cross_tokenizer != "off", "objective.cross_tokenizer", "all teachers share the student's tokenizer"),
        (s.from_teacher is not None, "student.from_teacher", "pruning starts from one teacher: give student.path"),
        (world > 1, "training.distributed", "several teachers run in one process for now"),
    ]
    for bad, key, why in refused:
        if bad:
            raise DistillError(f"recipe key {key}: {why} (recipe key teachers)")
    named = [x for x in recipe.teachers.values() if x.path is not None or x.cache is not None]
    if s.path is None and s.tokenizer is None and not named:
        raise DistillError(
            "recipe key student.tokenizer: a new student needs a tokenizer (no teacher has path or cache)"
        )


def models_view(recipe: Recipe) -> Recipe:
    """The recipe as `distill.train.setup.load_models` should read it: the student, and the tokenizer of the first
    teacher with a path (or a cache); no teacher is loaded there (each is loaded by `open_teachers`)."""
    sections = list(recipe.teachers.values())
    first = next((x for x in sections if x.path is not None), None) or next(
        (x for x in sections if x.cache is not None), TeacherConfig()
    )
    # A cache value (or a placeholder) keeps load_models from loading the teacher; it only names the tokenizer.
    teacher = TeacherConfig(
        path=first.path,
        cache=first.cache or "(teachers)",
        revision=first.revision,
        trust_remote_code=first.trust_remote_code,
    )
    return recipe.model_copy(update={"teacher": teacher, "teachers": None})


@dataclass
class Teacher:
    """One of the run's teachers and where its signal comes from."""

    name: str
    model: torch.nn.Module | None = None  # an online teacher, run here on its rows
    head: object = None  # its OutputHead (fused path), or None
    signal: object = None  # its cache (a CacheRows) or its server (a ServedSignal), or None when online


class CacheRows:
    """A teacher's cache of its own rows, read with the run's example indices."""

    def __init__(self, reader, rows: Sequence[int]):
        self.reader = reader
        self.local = {g: i for i, g in enumerate(rows)}  # run's example index -> the cache's

    def targets(self, example_indices, width: int, device=None):
        indices = example_indices.tolist() if isinstance(example_indices, torch.Tensor) else list(example_indices)
        return self.reader.targets([self.local[i] for i in indices], width, device)


class Teachers:
    """The teacher signal of a run with several teachers: `step_batches` marks each row's teacher
    (`teacher_index`), `step_loss` hands each teacher's rows to its own signal (`step_loss` below)."""

    routes = True

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers
        self.index = {t.name: k for k, t in enumerate(teachers)}

    def teacher_index(self, examples) -> torch.Tensor:
        """(B,) the position of each example's teacher in `self.teachers`."""
        return torch.tensor([self.index[e.teacher] for e in examples], dtype=torch.long)

    def _served(self) -> list[Teacher]:
        return [t for t in self.teachers if isinstance(t.signal, ServedSignal)]

    def begin_step(self, step: int, micro_batches, sampled: bool = False) -> None:
        """Each served teacher's rows of this step, in training order (micro-batches without its rows skipped,
        as `step_loss` skips them)."""
        for t in self._served():
            t.signal.begin_step(step, _rows_of(t.name, micro_batches), sampled)

    def prefetch(self, step: int, micro_batches) -> None:
        for t in self._served():
            t.signal.prefetch(step, _rows_of(t.name, micro_batches))

    def close(self) -> None:
        for t in self._served():
            t.signal.close()

    def step_loss(self, loss_module, models: Models, batch: dict, recipe: Recipe, normalizer: float, one_teacher):
        """The micro-batch's (loss, kd, ce, hidden sums): `one_teacher` (`distill.train.step.step_loss`) on each
        teacher's rows with that teacher's signal, summed; `normalizer` is the global one, so the sum is exact."""
        inner = getattr(loss_module, "module", loss_module)
        which = batch["teacher_index"]  # (B,) on the host: splitting costs no device sync
        total = None
        for k in sorted(set(which.tolist())):
            t = self.teachers[k]
            rows = torch.nonzero(which == k).squeeze(1)  # (b,)
            part_batch = {key: v.index_select(0, rows.to(v.device)) for key, v in batch.items()}
            inner.teacher_head = t.head  # the fused loss applies this teacher's head to its hidden states
            part = one_teacher(
                loss_module, dataclasses.replace(models, teacher=t.model), part_batch, recipe, normalizer, t.signal
            )
            total = part if total is None else tuple(a + b for a, b in zip(total, part, strict=True))
        return total


def _rows_of(name: str, micro_batches) -> list[list]:
    """The examples of teacher `name` in each micro-batch that has any, in order."""
    mine = [[e for e in examples if e.teacher == name] for examples in micro_batches]
    return [examples for examples in mine if examples]


def open_teachers(recipe: Recipe, models: Models, train_examples, device: torch.device, log=print) -> Teachers:
    """Load or open every teacher of recipe key `teachers`, each checked against the student's tokenizer."""
    opened = []
    for name, section in recipe.teachers.items():
        try:
            opened.append(_open_teacher(recipe, name, section, models, train_examples, device, log))
        except DistillError as e:
            raise DistillError(f"recipe key teachers.{name}: {e}") from None
    counts = {t.name: sum(e.teacher == t.name for e in train_examples) for t in opened}
    log("teachers: " + ", ".join(f"{name} ({n} training rows)" for name, n in counts.items()))
    return Teachers(opened)


def _open_teacher(recipe, name, section: TeacherConfig, models: Models, train_examples, device, log) -> Teacher:
    tokenizer, t = models.tokenizer, Teacher(name)
    if section.path is not None:
        theirs = load_tokenizer(section.path, "teacher", section.trust_remote_code, section.revision)
        difference = compare_tokenizers(theirs, tokenizer)
        if difference is not None:
            raise DistillError(f"its tokenizer differs from the student's ({difference}); all teachers share one")
    view = recipe.model_copy(update={"teacher": section, "teachers": None})
    rows = [i for i, e in enumerate(train_examples) if e.teacher == name]
    if section.cache is not None:
        from distill.cache.reader import open_cache_for_training

        # The cache was built from these rows alone, by a recipe that did not route them: compared without names.
        mine = [dataclasses.replace(train_examples[i], teacher=None) for i in rows]
        t.signal = CacheRows(open_cache_for_training(view, tokenizer, mine, models.vocab_size), rows)
    elif section.endpoint is not None:
        mine = [train_examples[i] for i in rows] or list(train_examples[:1])
        t.signal = ServedSignal(view, tokenizer, mine, models.vocab_size, log, section)
    elif recipe.needs_teacher:
        where = device if section.device == "auto" else pick_device(section.device, key=f"teachers.{name}.device")
        dtype = teacher_dtype(section.dtype, where)
        t.model = load_model(section.path, "teacher", dtype, section.trust_remote_code, section.revision)
        t.model.eval().requires_grad_(False).to(where)
        if check_vocabulary(tokenizer, t.model, models.student) != models.vocab_size:
            raise DistillError("its vocabulary differs from the student's tokenizer's")
    return t


def write_teachers_report(recipe: Recipe, result, eval_examples, device, show_progress: bool, log) -> dict:
    """The run's report with several teachers: each teacher with a path against the student on its own eval rows,
    in report.json["by_teacher"][NAME] = {model: metrics, "retention": {...}}; the top-level models and retention
    are those of the first such teacher (its report.md/html too), the others' full reports in by_teacher/NAME/."""
    from distill.report.evaluate import evaluate_models

    r, out = recipe.report, result.output_dir
    models = {"student": str(result.student_dir)}
    if r.baseline is not None:
        models["baseline"] = r.baseline
    by_teacher, first = {}, None
    for name, section in recipe.teachers.items():
        mine = [e for e in eval_examples if e.teacher == name]
        if section.path is None or not mine:
            log(f"report: teachers.{name} is not evaluated ({'no path' if mine else 'no eval rows'})")
            continue
        folder = out if first is None else out / "by_teacher" / name
        folder.mkdir(parents=True, exist_ok=True)
        eval_file = folder / "eval-data.jsonl"
        rows = "".join(json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask}) + "\n" for e in mine)
        atomic.write_text(eval_file, rows)
        full = first is None  # speed, draft, generation and tasks once, against the first teacher
        report = evaluate_models(
            section.path,
            models,
            str(eval_file),
            str(folder),
            max_length=recipe.data.max_length,
            batch_size=max(1, recipe.training.batch_size // recipe.training.grad_accum),
            max_rows=r.max_rows,
            generation=r.generation if full else None,
            speed=r.speed and full,
            draft=r.draft and full,
            tasks=r.tasks if full else (),
            tasks_limit=r.tasks_limit,
            device=str(device),
            dtype=section.dtype,
            show_progress=show_progress,
            log=log,
        )
        first = name if first is None else first
        by_teacher[name] = {**report["models"], "retention": report["retention"]}
    if first is not None:
        saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
        saved["by_teacher"] = by_teacher
        atomic.write_json(out / "report.json", saved)
    return by_teacher
