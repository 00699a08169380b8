"""The recipe: one YAML file that describes a run, validated before anything heavy happens.

One pydantic model per recipe section; every field has a default and a one-line description. Unknown keys,
wrong types and impossible values raise `DistillError` with one line naming the dotted key the user wrote.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import DistillError
from distill.losses.dense import DIVERGENCES
from distill.losses.hidden import check_layer_pairs

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# How a model's attention is computed (transformers' attn_implementation); auto = transformers' choice (sdpa).
AttnImplementation = Literal["auto", "sdpa", "flash_attention_2", "eager"]


def _comma_list(value: Any) -> Any:
    """`key=a,b` on the command line (a string) means the list [a, b]; `key=none` or empty means []."""
    if isinstance(value, str):
        return [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]
    return [] if value is None else value


class Section(BaseModel):
    # No inf/nan anywhere: `lr: .inf` would pass `gt=0` and wreck a run long after validation.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class TeacherConfig(Section):
    path: str | None = Field(None, description="Teacher model: a local folder or a hub id.")
    cache: str | None = Field(
        None, description="A `distill cache` folder to train from stored signals instead of running the teacher."
    )
    dtype: Dtype = Field(
        "auto", description="Teacher weights' dtype; auto = bfloat16 on a GPU or a CPU with native bf16, else float32."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the teacher.")
    trust_remote_code: bool = Field(False, description="Allow the teacher's own Python code from its folder/hub.")
    device: str = Field(
        "auto",
        description="Where the teacher runs: auto = the training device; cpu, cuda or cuda:N put it elsewhere "
        "(its activations are moved to the student's device).",
    )
    attn_implementation: AttnImplementation = Field(
        "auto", description="Teacher attention: auto (transformers' default), sdpa, flash_attention_2 or eager."
    )
    endpoint: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible server (vLLM, SGLang, ...): the teacher of `distill generate`, "
        "`distill cache` (prompt log-probs) and training without teacher.cache.",
    )
    endpoint_logprobs: Literal["auto", "prompt_logprobs", "echo"] = Field(
        "auto",
        description="How prompt log-probs are asked of teacher.endpoint: vLLM's prompt_logprobs, echo + logprobs, "
        "or auto (prompt_logprobs, else echo).",
    )
    model_name: str | None = Field(None, description="Model name at the endpoint; default: the server's first model.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the endpoint's API key (never written anywhere)."
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        # Whether the device exists is checked when the teacher is placed (distill.models.pick_device).
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"{value!r}: give auto, cpu, cuda or cuda:N")
        return value


class FromTeacherConfig(Section):
    layers: int | None = Field(None, gt=0, description="Number of the teacher's layers the student keeps.")
    params: str | None = Field(None, description="Parameter budget, e.g. '0.25x' of the teacher or '20M'.")
    hidden_size: int | None = Field(None, gt=0, description="Student hidden size (width pruning).")
    intermediate_size: int | None = Field(None, gt=0, description="Student MLP intermediate size.")
    heads: int | None = Field(None, gt=0, description="Student attention heads.")
    calibration: str | None = Field(None, description="Data used to measure importance; default: the train data.")
    layer_selection: Literal["kl", "influence", "uniform"] = Field(
        "kl",
        description="How depth pruning picks layers: kl = lowest KL to the teacher on calibration data, "
        "influence = block influence (ShortGPT), uniform = evenly spread.",
    )

    @field_validator("params", mode="before")
    @classmethod
    def _params_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("layer_selection", mode="before")
    @classmethod
    def _old_layer_selection_name(cls, value: Any) -> Any:
        # Block influence was first called "importance"; recipes written then keep working.
        return "influence" if value == "importance" else value

    @model_validator(mode="after")
    def _some_target(self) -> FromTeacherConfig:
        if all(v is None for v in (self.layers, self.params, self.hidden_size, self.intermediate_size, self.heads)):
            raise ValueError("give at least one of layers, params, hidden_size, intermediate_size, heads")
        return self


class LoraConfig(Section):
    """A LoRA adapter on the student (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

    r: int = Field(16, gt=0, description="Rank of the adapter: each adapted weight W gets W + (alpha / r) · B A.")
    alpha: float = Field(32.0, gt=0, description="Scale of the low-rank update (multiplied by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Layers that get an adapter: all-linear (every linear layer but the output head) or a list of "
        "module names (q_proj, v_proj, ...).",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            raise ValueError(f"{value!r}: give all-linear or a list of module names (e.g. [q_proj, v_proj])")
        if isinstance(value, list) and (not value or not all(name.strip() for name in value)):
            raise ValueError("give at least one module name, none empty")
        return value


class StudentConfig(Section):
    path: str | None = Field(None, description="Student model to start from: a local folder or a hub id.")
    config: dict[str, Any] | None = Field(
        None, description="A transformers config dict for a new, randomly initialized student."
    )
    from_teacher: FromTeacherConfig | None = Field(None, description="Build the student by pruning the teacher.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id; default: the teacher's.")
    revision: str | None = Field(None, description="Hub revision of the student.")
    trust_remote_code: bool = Field(False, description="Allow the student's own Python code from its folder/hub.")
    attn_implementation: AttnImplementation = Field(
        "auto", description="Student attention: auto (transformers' default), sdpa, flash_attention_2 or eager."
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train a LoRA adapter (extra [peft]) instead of all the student's weights; null = all weights. "
        "With student.path == teacher.path the teacher is the student's own base (one copy, adapter disabled).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        given = [name for name in ("path", "config", "from_teacher") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of path, config, from_teacher (got {', '.join(given)})")
        return self


class DataConfig(Section):
    train: str | None = Field(None, description="Training rows: a file, folder, or hub dataset id.")
    eval: str | None = Field(None, description="Evaluation rows; default: held out from train.")
    train_split: str = Field("train", description="Split to read when `train` is a hub or datasets folder.")
    eval_split: str = Field("validation", description="Split to read when `eval` is a hub or datasets folder.")
    max_length: int = Field(256, gt=1, description="Tokens per sequence; longer rows are truncated.")
    packing: bool = Field(False, description="Concatenate rows and cut into max_length blocks.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of train held out when no eval data is given.")
    eval_max_rows: int = Field(256, gt=0, description="At most this many rows are held out for evaluation.")
    skip_bad_rows: bool = Field(False, description="Skip malformed rows (and report the count) instead of stopping.")
    ignore_keys: list[str] = Field(
        default_factory=list,
        description="Row keys to ignore (metadata columns); any other key a row format does not read is refused.",
    )
    teacher_field: str = Field("teacher", description="With `teachers`: the row key naming the row's teacher.")


class OnPolicyConfig(Section):
    lambda_: float = Field(
        0.0,
        alias="lambda",
        ge=0,
        le=1,
        description="Share of steps trained on the student's own completions of the prompts (0 = off-policy).",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's completions.")
    max_new_tokens: int = Field(
        64, gt=0, description="Length limit of the student's completions (prompt + completion stay within max_length)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold of the student's completions.")
    prefix_tokens: int = Field(
        16, ge=0, description="Rows without a prompt (text) are prompted with this many first tokens; 0 = refuse them."
    )


class HiddenConfig(Section):
    """Hidden-state distillation added to the logit loss (`distill.losses.hidden`: TinyBERT / DistillKit style)."""

    weight: float = Field(0.0, ge=0, description="Weight of the hidden-state term added to the logit loss; 0 = off.")
    loss: Literal["cosine", "mse"] = Field(
        "cosine", description="Per token and layer pair: cosine = 1 - cos(student, teacher); mse = mean squared error."
    )
    layers: Literal["auto"] | list[tuple[int, int]] = Field(
        "auto",
        description="[[student_layer, teacher_layer], ...], layer k = the state after k decoder layers (0 = the "
        "embeddings); auto = student layer k with teacher layer round(k·T/S), k = 1..S.",
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        return check_layer_pairs(value)


class ObjectiveConfig(Section):
    divergence: str = Field("forward_kl", description=f"One of {', '.join(DIVERGENCES)}.")
    beta: float = Field(0.5, ge=0, le=1, description="jsd only: 0 = forward_kl, 1 = reverse_kl.")
    skew: float = Field(0.1, ge=0, lt=1, description="skew_* only: share of the mixture taken by the first argument.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions (τ² applied).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy term.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the divergence term; 0 = train on hard labels only.")
    fused: bool = Field(True, description="Memory-lean chunked loss that never builds the full logits.")
    fused_chunk_mib: int = Field(
        256, ge=1, description="Logits the fused loss forms at a time, MiB; more = fewer, larger (faster) chunks."
    )
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="Student-generated data (GKD).")
    hidden: HiddenConfig = Field(default_factory=HiddenConfig, description="Hidden-state distillation (weight 0: off).")
    cross_tokenizer: Literal["off", "uld", "aligned"] = Field(
        "off",
        description="Teacher and student with different tokenizers: uld (sorted-probability distance), aligned "
        "(the divergence over shared tokens at 1:1 spans, uld elsewhere); off = one tokenizer is required.",
    )

    @field_validator("cross_tokenizer", mode="before")
    @classmethod
    def _off_is_a_word(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, value: str) -> str:
        if value not in DIVERGENCES:
            raise ValueError(f"unknown divergence {value!r}; choose one of {', '.join(DIVERGENCES)}")
        return value

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _some_signal(self) -> ObjectiveConfig:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train on")
        return self


class TrainingConfig(Section):
    steps: int = Field(1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step over all devices (global batch).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per device per step.")
    lr: float = Field(1.0e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a share of the peak (cosine/linear).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype; auto = bf16 on GPUs that support it, none on CPU."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train; auto picks a GPU.")
    seed: int = Field(0, description="Seed of initialization, data order and sampling.")
    save_every: int = Field(100, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    eval_every: int = Field(100, gt=0, description="Steps between evaluations.")
    eval_batches: int | None = Field(None, gt=0, description="Limit periodic evaluation to this many batches.")
    log_every: int = Field(10, gt=0, description="Steps between metrics.jsonl lines (and host syncs).")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Under accelerate launch / torchrun: ddp replicates the student; fsdp (FSDP2) shards it; "
        "auto = ddp when several processes run.",
    )
    shard_teacher: bool = Field(True, description="fsdp only: shard the teacher too (forward only, no optimizer).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers fed the metrics.jsonl scalars at the same steps (extras [tensorboard], "
        "[wandb], [mlflow], [trackio]); TensorBoard writes to output.dir/tensorboard/.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        return _comma_list(value)

    gradient_checkpointing: bool | Literal["selective"] = Field(
        False, description="Recompute student activations in backward: true = all; selective = elementwise ops only."
    )
    compile: bool = Field(False, description="torch.compile the student's and teacher's decoder layers.")

    @model_validator(mode="after")
    def _divisible(self) -> TrainingConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


class CacheConfig(Section):
    dir: str = Field("./cache", description="Folder of the offline teacher signals.")
    source: Literal["teacher", "generated"] = Field(
        "teacher",
        description="teacher = run the teacher over data.train; generated = read the top_logprobs that "
        "`distill generate` stored in data.train (no teacher is loaded).",
    )
    # The defaults are the measured best (README, "Offline teacher signals"): top-32 + 8 tail draws, int4, packed
    # ids is 90 B/token and +0.2% KL vs online, where top-32 fp16 alone was 134 B and +4.2%.
    top_k: int = Field(32, gt=0, description="Teacher log-probs stored per token.")
    representation: Literal["top_k", "sampled", "both"] = Field(
        "top_k", description="What `distill cache` stores: top-k + tail mass, m sampled tokens, or both."
    )
    sample_m: int = Field(16, gt=0, le=255, description="Tokens drawn from the teacher per position (sampled).")
    precision: Literal["float32", "float16", "int8", "int4"] = Field(
        "int4", description="Storage of log-probs; int8/int4 = 8/4-bit codes over each token's own range."
    )
    pack_ids: bool = Field(True, description="Store ids in ceil(log2 V) bits each instead of 16/32.")
    tail_samples: int | None = Field(
        None,
        ge=0,
        le=255,
        description="top_k: also draw this many tokens from the teacher's tail (0 = none); default 8 "
        "(0 for cache.source=generated, which has no tail to draw from).",
    )
    tail: Literal["bucket", "uniform"] = Field(
        "bucket", description="Top-k training: the rest mass as one extra class, or spread evenly over the others."
    )
    shard_tokens: int = Field(1 << 20, gt=0, description="Loss tokens per shard (shards end at example boundaries).")
    batch_size: int = Field(8, gt=0, description="Sequences per teacher forward pass while building.")
    train_on: Literal["auto", "top_k", "sampled"] = Field(
        "auto", description="Representation training reads; auto = top_k when stored, else sampled."
    )


class GenerateConfig(Section):
    prompts: str | None = Field(None, description="Rows with `prompt` or `messages`; default: data.train.")
    output: str | None = Field(None, description="Completions JSONL; default: output.dir/generated.jsonl.")
    samples_per_prompt: int = Field(1, gt=0, description="Completions drawn per prompt.")
    max_new_tokens: int = Field(256, gt=0, description="Length limit of each completion.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = no limit.")
    logprobs: int = Field(0, ge=0, le=20, description="Teacher top-k log-probs stored per completion token; 0 = none.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion.")
    batch_size: int = Field(8, gt=0, description="Prompts per batch of a local teacher.")
    concurrency: int = Field(8, gt=0, description="Requests in flight at once to an endpoint.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds before a request to an endpoint is retried.")
    max_retries: int = Field(5, ge=0, description="Retries of a request after 429, 5xx or a timeout.")
    backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first retry; doubles per retry (with jitter) unless Retry-After says."
    )
    dedupe: bool = Field(True, description="Drop completions identical to an earlier one for the same prompt.")


class ReportConfig(Section):
    enabled: bool = Field(True, description="Evaluate teacher and student and write report.json/.md/.html at the end.")
    speed: bool = Field(True, description="Measure prefill and decode tokens/s in the report.")
    baseline: str | None = Field(None, description="Another student folder to compare against (e.g. hard labels).")
    generation: str | None = Field(None, description="Prompt/answer rows for an exact-match generation check.")
    max_rows: int | None = Field(None, gt=0, description="Evaluate at most this many held-out examples.")
    draft: bool = Field(
        True,
        description="Measure each model as the teacher's speculative-decoding draft (acceptance, speed-up); "
        "a timing, so only with report.speed.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval-harness tasks run on the teacher, students and baseline: task, group or tag names, "
        "or task YAML files (extra [tasks]); report.json['tasks'] holds each score and its retention.",
    )
    tasks_limit: int | None = Field(
        None, gt=0, description="Score at most this many documents per lm-eval task (lm-eval's limit); null = all."
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_list(cls, value: Any) -> Any:
        return _comma_list(value)


class OutputConfig(Section):
    dir: str = Field("./runs/distill", description="Run folder: student/, checkpoints/, metrics.jsonl, reports.")
    dtype: Dtype = Field(
        "auto",
        description="dtype of the saved student; auto = the stored dtype of the model it started from "
        "(student.path, or the teacher for student.from_teacher; float32 for student.config).",
    )


class Recipe(Section):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The model to learn from.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The model to train.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and evaluation data.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="What the student optimizes.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimization and bookkeeping.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Offline teacher signals.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Teacher completions (`distill generate`)."
    )
    report: ReportConfig = Field(default_factory=ReportConfig, description="The retention report after training.")
    teachers: dict[str, TeacherConfig] | None = Field(
        None, description="Several teachers instead of `teacher`: name -> a teacher section (rows name theirs)."
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")

    @property
    def needs_teacher(self) -> bool:
        return self.objective.kd_weight > 0

    def check_runnable(self) -> None:
        """Cross-section checks for training, before any model is loaded."""
        if self.objective.on_policy.lambda_ > 0:
            self._check_on_policy()
        if self.objective.hidden.weight > 0:
            self._check_hidden()
        if self.data.train is None:
            raise DistillError("recipe key data.train: no training data given")
        t = self.teacher
        if self.needs_teacher and t.path is None and t.cache is None and t.endpoint is None and not self.teachers:
            raise DistillError(
                "recipe key teacher.path: no teacher given (set teacher.path, teacher.cache or teacher.endpoint, "
                "or objective.kd_weight=0 to train on hard labels only)"
            )
        if self.student.path is None and self.student.config is None and self.student.from_teacher is None:
            raise DistillError("recipe key student: give student.path, student.config or student.from_teacher")
        if self.student.lora is not None and self.student.config is not None:
            raise DistillError(
                "recipe key student.lora: an adapter trains on top of pretrained weights; a new random "
                "student.config has none worth freezing (train all its weights: student.lora=null)"
            )
        if self.student.from_teacher is not None and self.teacher.path is None:
            raise DistillError("recipe key student.from_teacher: needs teacher.path to prune from")
        no_tokenizer = self.student.tokenizer is None and self.student.path is None and self.teacher.cache is None
        if self.teacher.path is None and no_tokenizer and not self.teachers:
            raise DistillError("recipe key student.tokenizer: a new student without a teacher needs a tokenizer")

    def _check_on_policy(self) -> None:
        o = self.objective
        if o.kd_weight == 0:
            raise DistillError(
                "recipe key objective.on_policy.lambda: on-policy steps need the teacher's signal (kd_weight > 0)"
            )
        if self.teacher.cache is not None:
            raise DistillError(
                "recipe key objective.on_policy.lambda: a teacher.cache only holds signals for the fixed data; "
                "on-policy steps need the teacher running on the student's samples (teacher.path or "
                "teacher.endpoint, no cache)"
            )
        if o.ce_weight > 0:
            raise DistillError(
                "recipe key objective.ce_weight: on-policy completions are the student's own samples, not ground "
                "truth; set ce_weight=0 when objective.on_policy.lambda > 0"
            )

    def _check_hidden(self) -> None:
        t, why = self.teacher, None
        if self.objective.kd_weight == 0:
            why = "the hidden-state term is added to the logit loss; set objective.kd_weight > 0"
        elif t.cache is not None or t.endpoint is not None:
            source = "a teacher.cache stores" if t.cache is not None else "a served teacher (teacher.endpoint) sends"
            why = f"{source} output distributions, not hidden states; run the teacher here (teacher.path alone)"
        elif self.objective.cross_tokenizer != "off":
            why = "across tokenizers the teacher's positions are not the student's; set objective.cross_tokenizer=off"
        elif self.teachers:
            why = "it pairs the student's layers with one teacher's; use teacher instead of teachers"
        if why is not None:
            raise DistillError(f"recipe key objective.hidden.weight: {why}, or set objective.hidden.weight=0")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


# ---------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; users mean a float, as in YAML 1.2."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: builds no Python objects


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key missing"
    where = f"recipe key {key}" if key else "recipe"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def parse_override(text: str) -> tuple[str, Any]:
    """'training.lr=3e-4' -> ('training.lr', 0.0003); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise DistillError(f"override {text!r}: expected dotted.key=value")
    try:
        return key, _yaml_load(value) if value else None
    except yaml.YAMLError:
        return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). Validation of the keys happens in the schema."""
    import copy

    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DistillError(f"override {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative local paths in the recipe relative to the recipe file, as users expect."""

    def local(value: Any) -> Any:
        return str((base / value).resolve()) if isinstance(value, str) and value.startswith(("./", "../")) else value

    def fix(node: Any, *keys: str) -> None:
        for key in keys if isinstance(node, dict) else ():
            if key in node:
                node[key] = local(node[key])

    def section(name: str) -> Any:
        return data.get(name) if isinstance(data.get(name), dict) else {}

    fix(data.get("teacher"), "path", "cache")
    for teacher in section("teachers").values():
        fix(teacher, "path", "cache")
    fix(data.get("student"), "path", "tokenizer")
    fix(section("student").get("from_teacher"), "calibration")
    fix(data.get("data"), "train", "eval")
    fix(data.get("cache"), "dir")
    fix(data.get("report"), "baseline", "generation")
    fix(data.get("generate"), "prompts", "output")
    fix(data.get("output"), "dir")
    tasks = section("report").get("tasks")
    if isinstance(tasks, list):  # task YAML files; task names stay as they are
        section("report")["tasks"] = [local(t) for t in tasks]
    return data


def recipe_from_dict(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    data = apply_overrides(data, overrides or {})
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise DistillError(_format_error(e)) from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Relative paths starting with ./ or ../ are taken relative
    to the recipe's folder; overrides given on the command line are taken relative to the current folder."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe {path} does not exist")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise DistillError(f"recipe {path} is not valid YAML{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistillError(f"recipe {path}: expected a mapping of sections at the top level")
    data = _resolve_paths(data, path.parent.resolve())
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return recipe_from_dict(data, overrides)
