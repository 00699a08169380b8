"""`distill generate`: the teacher writes completions for a set of prompts (sequence-level distillation).

The student is later trained on the teacher's text instead of (or besides) its logits, as the DeepSeek-R1
distilled models were (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"). The output is a JSONL data set,
one row per completion, that `distill train` reads as prompt/completion rows (loss on the completion)::

    {"prompt_index": 0, "sample": 0, "prompt": "...", "completion": "...", "finish_reason": "stop",
     "prompt_ids": [...], "completion_ids": [...], "token_logprobs": [...], "top_logprobs": [[[id, lp], ...], ...]}

Chat prompts (`messages` rows) come back as `messages` with the teacher's answer appended as the assistant turn.
`top_logprobs` holds, per completion token, the teacher's k most likely next tokens at temperature 1 (from its raw
logits, over the tokenizer's vocabulary), so the same file can feed logit distillation later.

Teachers: a local transformers model (batched, left-padded, KV-cached `generate`), or any OpenAI-compatible endpoint
(`teacher.endpoint`; see `distill.generate.client`).

Resumable: finished prompts are appended (all samples of a prompt in one go, flushed) to a partial file beside the
output, with the settings that made it in a sidecar JSON. A rerun after a kill drops a torn last group, skips the
finished prompts, and refuses a partial file made with other prompts or sampling settings. The output appears,
sorted by (prompt_index, sample) and with duplicate completions removed, only when every prompt is done. Local
batches are fixed by the prompt set alone (sorted by length, cut into `batch_size` chunks, one seed per batch), so
a resumed run writes the same completions as one that was never interrupted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import atomic
from distill.data import pad_id_of, read_rows
from distill.errors import DistillError
from distill.sampling import decode, eos_ids, stable_hash

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One distinct prompt: plain text (`prompt`) or a conversation (`messages`) to be answered."""

    index: int
    prompt: str | None = None
    messages: list[dict] | None = None

    @property
    def key(self) -> str:
        return json.dumps(self.prompt if self.messages is None else self.messages, sort_keys=True, ensure_ascii=False)


def read_prompts(source: str, split: str = "train") -> list[Prompt]:
    """Distinct prompts of a data source in order of first appearance (a repeated prompt is generated once)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for where, row in read_rows(source, split):
        if isinstance(row, Exception):
            raise DistillError(f"bad prompt row at {where}: {row}")
        if not isinstance(row, dict):
            raise DistillError(f"bad prompt row at {where}: expected an object, got {type(row).__name__}")
        row = {key: value for key, value in row.items() if value is not None}
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
                raise DistillError(
                    f'bad prompt row at {where}: "messages" must be a non-empty list of {{"role", "content"}} objects'
                )
            prompt = Prompt(len(prompts), messages=[{"role": m["role"], "content": m["content"]} for m in messages])
        elif isinstance(row.get("prompt"), str):
            prompt = Prompt(len(prompts), prompt=row["prompt"])
        else:
            raise DistillError(f'bad prompt row at {where}: a prompt row needs "prompt" (a string) or "messages"')
        if prompt.key not in seen:
            seen.add(prompt.key)
            prompts.append(prompt)
    if not prompts:
        raise DistillError(f"prompts {source}: no rows")
    return prompts


def _is_message(message: object) -> bool:
    return (
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
    )


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(p.key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids the teacher continues: exactly as `distill.data` tokenizes the row's prompt side for training."""
    if prompt.messages is None:
        return list(tokenizer(prompt.prompt, add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistillError("chat prompts (messages rows) need a tokenizer with a chat template, and this one has none")
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- local teacher


@dataclass
class Completion:
    """One sampled continuation. `token_ids` are the tokens the model produced (an ending EOS and a stop string's
    tokens included, as vLLM reports them); `text` has neither (as OpenAI-compatible servers return it)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    token_logprobs: list[float] | None = None  # log-prob of each produced token at temperature 1
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the k most likely (id, log-prob)


def _finish(tokenizer, ids: list[int], eos: set[int], stop: Sequence[str], max_new_tokens: int) -> tuple[int, str, str]:
    """Where a generated row ends: (number of produced tokens, text, finish_reason)."""
    first_eos = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if first_eos is None else ids[:first_eos]
    text = tokenizer.decode(body, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:
        start, string = min(hits)
        # The token that completes the stop string ends the completion; BPE may spread the string over several.
        for k in range(1, len(body) + 1):
            if len(tokenizer.decode(body[:k], skip_special_tokens=True)) >= start + len(string):
                return k, text[:start], "stop"
    if first_eos is not None:
        return first_eos + 1, text, "stop"
    return len(ids), text, "length" if len(ids) >= max_new_tokens else "stop"


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    seed: int | None = None,
) -> list[list[Completion]]:
    """Sample `n` completions for each tokenized prompt in one batched, KV-cached `generate` call.

    Prompts are left-padded so every row's next token sits in the last column. temperature 0 = greedy.
    `logprobs` None = none; k >= 0 = the produced token's log-prob plus the top k, from the raw logits at
    temperature 1 over the tokenizer's vocabulary (embedding rows past it are padding and never sampled).
    `seed` seeds the sampling (on a forked RNG, see `distill.sampling.decode`), so the same call gives the same
    samples.
    Returns one list of n completions per prompt.
    """
    vocab = len(tokenizer)
    pad = pad_id_of(tokenizer)
    eos = eos_ids(model, tokenizer)
    # Greedy decoding gives one answer: decode it once and copy it (transformers refuses greedy n > 1).
    draws = n if temperature > 0 else 1
    # The recipe's sampling only, never the model's generation_config (Qwen ships repetition_penalty 1.05), and no
    # id past the tokenizer: `decode` sees to both.
    out = decode(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
        vocab_size=vocab,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_return_sequences=draws,
        stop_strings=stop,
        tokenizer=tokenizer,
        output_logits=logprobs is not None,
        seed=seed,
    )
    produced = out.new_ids.tolist()  # (B*draws, S): HF repeats each prompt `draws` times, in order
    token_lp = top = None
    if logprobs is not None and out.logits:
        chosen, top_ids, top_lps = [], [], []
        for step, logits in enumerate(out.logits):  # S x (B*n, rows)
            lp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)  # (B*n, V)
            step_ids = out.new_ids[:, step].clamp_max(vocab - 1)  # (B*n,) padding ids land anywhere
            chosen.append(lp.gather(1, step_ids[:, None])[:, 0])  # (B*n,)
            if logprobs > 0:
                values, indices = lp.topk(min(logprobs, vocab), dim=-1)  # (B*n, k)
                top_ids.append(indices)
                top_lps.append(values)
        token_lp = torch.stack(chosen, 1).tolist()  # (B*n, S)
        if logprobs > 0:
            top = (torch.stack(top_ids, 1).tolist(), torch.stack(top_lps, 1).tolist())  # (B*n, S, k) each
    eos_set = set(eos)
    result: list[list[Completion]] = []
    for row, ids in enumerate(produced):
        length, text, reason = _finish(tokenizer, ids, eos_set, stop, max_new_tokens)
        completion = Completion(text, ids[:length], reason)
        if token_lp is not None:
            completion.token_logprobs = token_lp[row][:length]
            completion.top_logprobs = (
                [list(zip(i, v, strict=True)) for i, v in zip(top[0][row][:length], top[1][row][:length], strict=True)]
                if top is not None
                else []
            )
        if row % draws == 0:
            result.append([])
        result[-1].append(completion)
    if draws != n:
        result = [[copy.deepcopy(c) for _ in range(n)] for (c,) in result]
    return result


def _local_plan(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Batches of prompt indices: sorted by length (less padding), then cut. Depends on the prompts only, so a
    resumed run regenerates exactly the batches of the first run."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _derived_seed(seed: int, *parts: object) -> int:
    """A seed per batch/prompt: independent streams instead of seed+i, which would overlap between runs. 31 bits:
    servers take it as a signed 32-bit integer."""
    return stable_hash(seed, *parts, bits=31)


# ---------------------------------------------------------------- endpoint teacher


def _parse_token(token: str) -> int | str:
    match = _TOKEN_ID.match(token)
    return int(match.group(1)) if match else token


def _parse_completion_logprobs(logprobs: dict | None, k: int) -> dict:
    """/v1/completions `logprobs` -> our fields. Ids when the server gave tokens as "token_id:N" (vLLM's
    return_tokens_as_token_ids), otherwise the token strings."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        return {}
    tokens = [_parse_token(t) for t in logprobs["tokens"]]
    fields: dict = {}
    if all(isinstance(t, int) for t in tokens):
        fields["completion_ids"] = tokens
    else:
        fields["completion_tokens"] = [str(t) for t in logprobs["tokens"]]
    if isinstance(logprobs.get("token_logprobs"), list):
        fields["token_logprobs"] = logprobs["token_logprobs"]
    if k > 0 and isinstance(logprobs.get("top_logprobs"), list):
        # The server may add the produced token to each dict (OpenAI: "up to logprobs+1"); keep the k best.
        fields["top_logprobs"] = [
            [[_parse_token(t), lp] for t, lp in sorted((d or {}).items(), key=lambda kv: -kv[1])[:k]]
            for d in logprobs["top_logprobs"]
        ]
    return fields


def _parse_chat_logprobs(logprobs: dict | None, k: int) -> dict:
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return {}
    tokens = [_parse_token(str(c.get("token"))) for c in content]
    fields: dict = {}
    if all(isinstance(t, int) for t in tokens):
        fields["completion_ids"] = tokens
    else:
        fields["completion_tokens"] = [str(c.get("token")) for c in content]
    fields["token_logprobs"] = [c.get("logprob") for c in content]
    if k > 0:
        fields["top_logprobs"] = [
            [[_parse_token(str(t.get("token"))), t.get("logprob")] for t in (c.get("top_logprobs") or [])[:k]]
            for c in content
        ]
    return fields


class EndpointTeacher:
    """Builds OpenAI requests from the recipe and turns the answers into completion fields."""

    def __init__(self, client, model_name: str, g, seed: int):
        self.client, self.model_name, self.g, self.seed = client, model_name, g, seed
        self.token_ids = True  # ask for "token_id:N" tokens until the server refuses the parameter

    def _body(self, prompt: Prompt, n: int, seed: int) -> tuple[str, dict]:
        g = self.g
        body: dict = {"model": self.model_name, "max_tokens": g.max_new_tokens, "n": n, "seed": seed}
        if g.temperature > 0:
            body.update(temperature=g.temperature, top_p=g.top_p)
            if g.top_k:
                body["top_k"] = g.top_k  # an extension (vLLM, SGLang); only sent when asked for
        else:
            body["temperature"] = 0.0
        if g.stop:
            body["stop"] = list(g.stop)
        if prompt.messages is None:
            path = "/completions"
            body["prompt"] = prompt.prompt
            if g.logprobs:
                body["logprobs"] = g.logprobs
        else:
            path = "/chat/completions"
            body["messages"] = prompt.messages
            if g.logprobs:
                body.update(logprobs=True, top_logprobs=g.logprobs)
        if g.logprobs and self.token_ids:
            body["return_tokens_as_token_ids"] = True
        return path, body

    def complete(self, prompt: Prompt) -> list[dict]:
        """`samples_per_prompt` completions of one prompt, as output-row fields (sample order)."""
        g = self.g
        choices: list[dict] = []
        while len(choices) < g.samples_per_prompt:
            # Servers that ignore `n` answer one choice: ask again for the rest, with another seed.
            missing = g.samples_per_prompt - len(choices)
            path, body = self._body(prompt, missing, _derived_seed(self.seed, prompt.index, len(choices)))
            try:
                answer = self.client.post(path, body)
            except DistillError as e:
                if "return_tokens_as_token_ids" not in str(e) or not self.token_ids:
                    raise
                self.token_ids = False  # a strict server (the OpenAI API) rejects the vLLM extension
                continue
            got = answer.get("choices")
            if not isinstance(got, list) or not got:
                raise DistillError(f"endpoint {self.client.base_url}{path}: the answer has no choices")
            choices.extend(sorted(got, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)[:missing])
        return [self._fields(prompt, choice) for choice in choices]

    def _fields(self, prompt: Prompt, choice: dict) -> dict:
        if not isinstance(choice, dict):
            raise DistillError(f"endpoint {self.client.base_url}: a choice is not an object")
        if prompt.messages is None:
            text = choice.get("text")
            extra = _parse_completion_logprobs(choice.get("logprobs"), self.g.logprobs) if self.g.logprobs else {}
        else:
            message = choice.get("message") or {}
            text = message.get("content") if isinstance(message, dict) else None
            extra = _parse_chat_logprobs(choice.get("logprobs"), self.g.logprobs) if self.g.logprobs else {}
        if not isinstance(text, str):
            raise DistillError(f"endpoint {self.client.base_url}: a choice has no text")
        fields = {"completion": text, "finish_reason": choice.get("finish_reason")}
        if choice.get("stop_reason") is not None:
            # vLLM: the stop string (or stop token id) the completion stopped at; training appends no EOS after a
            # stop string. None (stopped by EOS) is left out.
            fields["stop_reason"] = choice["stop_reason"]
        return {**fields, **extra}


# ---------------------------------------------------------------- partial file (resume)


# Recipe keys of the settings that are not in the generate section, for error messages.
_SETTING_NAMES = {
    "seed": "training.seed",
    "teacher": "teacher.path",
    "dtype": "teacher.dtype",
    "prompts": "prompts file",
    "teacher_model": "teacher.model_name",
}


class PartialFile:
    """The append-only file of finished prompts, with the settings that made it in a sidecar JSON."""

    def __init__(self, output: Path, settings: dict, samples: int, log: Callable[[str], None]):
        self.path = output.with_name(f".{output.name}.partial")
        self.meta = output.with_name(f".{output.name}.partial.json")
        self.samples = samples
        self.done: set[int] = set()
        self._lock = threading.Lock()
        # A partial file with nothing in it holds no work to protect: start over with the new settings.
        started = self.path.exists() and self.path.stat().st_size > 0
        if started:
            self._check(settings)
            self._recover()
            if self.done:
                log(f"generate: resuming, {len(self.done)} prompts already done ({self.path})")
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.meta, settings)
            self.path.write_bytes(b"")
        self._file = self.path.open("ab")

    def _check(self, settings: dict) -> None:
        try:
            before = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DistillError(
                f"generate: {self.path} has no readable settings file {self.meta.name}; delete both to start over"
            ) from None
        changed = [key for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)]
        if changed:
            key = changed[0]
            if {"prompts_sha256", "prompt_count"} & set(changed):
                what = "set of prompts"
            else:
                name = _SETTING_NAMES.get(key, f"generate.{key}")
                what = f"{name} (was {before.get(key)!r}, now {settings.get(key)!r})"
            raise DistillError(
                f"generate: {self.path} was started with a different {what}; delete it and {self.meta.name} "
                "to start over, or restore the recipe"
            )

    def _recover(self) -> None:
        """Keep whole prompts only: a kill can tear the last line or leave a prompt's samples half-written."""
        data = self.path.read_bytes()
        keep = 0  # bytes of the file that hold complete prompts
        counts: dict[int, int] = {}
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            try:
                row = json.loads(data[start:end])
                index = int(row["prompt_index"])
            except (ValueError, KeyError, TypeError):
                break
            counts[index] = counts.get(index, 0) + 1
            start = end + 1
            if counts[index] == self.samples:
                keep = start
                self.done.add(index)
        if keep < len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def append(self, rows: list[dict]) -> None:
        """All samples of one prompt in one write, flushed to the OS: a kill after this loses nothing of it."""
        blob = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        with self._lock:
            self._file.write(blob)
            self._file.flush()
            self.done.add(rows[0]["prompt_index"])

    def finish(self, output: Path, prompts: int, dedupe: bool) -> tuple[int, int]:
        """Sort, drop duplicates, write `output` atomically, remove the partial file. Returns (rows, dropped)."""
        self._file.close()
        rows = [json.loads(line) for line in self.path.read_bytes().splitlines() if line.strip()]
        rows.sort(key=lambda r: (r["prompt_index"], r["sample"]))
        got = {r["prompt_index"] for r in rows}
        if len(rows) != prompts * self.samples or got != set(range(prompts)):
            raise DistillError(f"internal error: {self.path} holds {len(rows)} rows, expected {prompts * self.samples}")
        kept, seen = [], set()
        for r in rows:
            key = (r["prompt_index"], r["completion"])
            if dedupe and key in seen:
                continue
            seen.add(key)
            kept.append(r)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return len(kept), len(rows) - len(kept)

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- the stage


def _prompt_fields(prompt: Prompt, completion: str) -> dict:
    if prompt.messages is None:
        return {"prompt": prompt.prompt}
    return {"messages": [*prompt.messages, {"role": "assistant", "content": completion}]}


def _row(prompt: Prompt, sample: int, fields: dict) -> dict:
    return {"prompt_index": prompt.index, "sample": sample, **_prompt_fields(prompt, fields["completion"]), **fields}


def output_path(recipe) -> Path:
    return Path(recipe.generate.output or Path(recipe.output.dir) / "generated.jsonl")


def generate(recipe, log: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Run `distill generate`: write (or finish) the completions file and return its path."""
    g, t = recipe.generate, recipe.teacher
    source = g.prompts or recipe.data.train
    if source is None:
        raise DistillError("recipe key generate.prompts: no prompts given (set generate.prompts or data.train)")
    if t.endpoint is None and t.path is None:
        raise DistillError("recipe key teacher: `distill generate` needs teacher.path or teacher.endpoint")
    output = output_path(recipe)
    if output.is_dir():
        raise DistillError(f"recipe key generate.output: {output} is a folder; give a file name")
    prompts = read_prompts(source, recipe.data.train_split)
    settings = {
        "prompts": str(Path(source).resolve()) if Path(source).exists() else str(source),
        "prompts_sha256": prompts_fingerprint(prompts),
        "prompt_count": len(prompts),
        "seed": recipe.training.seed,
        **{
            key: getattr(g, key)
            for key in ("samples_per_prompt", "max_new_tokens", "temperature", "top_p", "top_k", "logprobs", "stop")
        },
    }
    if t.endpoint is not None:
        return _generate_endpoint(recipe, prompts, settings, output, log, show_progress)
    return _generate_local(recipe, prompts, settings, output, log, show_progress)


def _progress(log, show: bool, done: int, total: int, every: int) -> None:
    if show and (done == total or done % every == 0):
        log(f"generate: {done}/{total} prompts done")


def _finish_run(job: PartialFile, output: Path, prompts: list[Prompt], g, log) -> Path:
    rows, dropped = job.finish(output, len(prompts), g.dedupe)
    note = f" ({dropped} duplicate completions removed)" if dropped else ""
    log(f"generate: wrote {rows} completions for {len(prompts)} prompts to {output}{note}")
    return output


def _generate_local(recipe, prompts, settings, output, log, show_progress) -> Path:
    from distill.models import load_config, load_model, load_tokenizer, max_context, resolve_dtype

    g, t = recipe.generate, recipe.teacher
    device = torch.device("cuda" if recipe.training.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(t.dtype, device)
    settings = {**settings, "teacher": t.path, "dtype": str(dtype).removeprefix("torch."), "batch_size": g.batch_size}
    # The teacher writes with its own tokenizer; the student must share it to learn from the ids anyway.
    tokenizer = load_tokenizer(t.path, "teacher", t.trust_remote_code, t.revision)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    context = max_context(load_config(t.path, "teacher", t.trust_remote_code, t.revision))
    longest = max(len(ids) for ids in prompt_ids)
    if context is not None and longest + g.max_new_tokens > context:
        raise DistillError(
            f"recipe key generate.max_new_tokens: a prompt of {longest} tokens plus {g.max_new_tokens} new "
            f"tokens exceeds the teacher's context of {context}"
        )
    job = PartialFile(output, settings, g.samples_per_prompt, log)
    try:
        plan = _local_plan(prompt_ids, g.batch_size)
        todo = [number for number, batch in enumerate(plan) if not set(batch) <= job.done]
        if todo:
            model = load_model(t.path, "teacher", dtype, t.trust_remote_code, t.revision).eval().to(device)
            if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
                raise DistillError("teacher has fewer output rows than its tokenizer has tokens")
            every = max(1, len(prompts) // 10)
            ends = set(eos_ids(model, tokenizer))
            log(f"generate: {len(prompts) - len(job.done)} prompts with {t.path} on {device} ({len(todo)} batches)")
            for number in todo:
                batch = plan[number]
                completions = sample_completions(
                    model,
                    tokenizer,
                    [prompt_ids[i] for i in batch],
                    n=g.samples_per_prompt,
                    max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    top_p=g.top_p,
                    top_k=g.top_k,
                    stop=g.stop,
                    logprobs=g.logprobs or None,
                    seed=_derived_seed(recipe.training.seed, "batch", number),
                )
                for i, samples in zip(batch, completions, strict=True):
                    if i in job.done:
                        continue
                    job.append(
                        [
                            _local_row(prompts[i], prompt_ids[i], s, c, _stop_reason(tokenizer, c, g.stop, ends))
                            for s, c in enumerate(samples)
                        ]
                    )
                    _progress(log, show_progress, len(job.done), len(prompts), every)
    except BaseException:
        job.close()
        raise
    return _finish_run(job, output, prompts, g, log)


def _stop_reason(tokenizer, c: Completion, stop: Sequence[str], ends: set[int]) -> str | None:
    """The stop string a completion stopped at (vLLM's `stop_reason`), None when it ended otherwise. Training
    appends no EOS after it: the teacher never wrote one there."""
    if c.finish_reason != "stop" or not c.token_ids or c.token_ids[-1] in ends:
        return None
    tail = tokenizer.decode(c.token_ids, skip_special_tokens=True)[len(c.text) :]
    return next((s for s in stop if s and tail.startswith(s)), None)


def _local_row(prompt: Prompt, prompt_ids: list[int], sample: int, c: Completion, stop_reason: str | None) -> dict:
    fields = {"completion": c.text, "finish_reason": c.finish_reason, "prompt_ids": prompt_ids}
    if stop_reason is not None:
        fields["stop_reason"] = stop_reason
    fields["completion_ids"] = c.token_ids
    if c.token_logprobs is not None:
        fields["token_logprobs"] = c.token_logprobs
        fields["top_logprobs"] = [[[i, lp] for i, lp in step] for step in c.top_logprobs]
    return _row(prompt, sample, fields)


def _generate_endpoint(recipe, prompts, settings, output, log, show_progress) -> Path:
    from distill.generate.client import EndpointClient

    g, t = recipe.generate, recipe.teacher
    api_key = os.environ.get(t.api_key_env) or None
    client = EndpointClient(
        t.endpoint,
        api_key=api_key,
        timeout_s=g.timeout_s,
        max_retries=g.max_retries,
        backoff_s=g.backoff_s,
        concurrency=g.concurrency,
        log=log,
    )
    with client:
        model_name = t.model_name
        if model_name is None:
            names = client.model_names()
            if not names:
                raise DistillError(f"endpoint {t.endpoint}/models lists no model; set teacher.model_name")
            model_name = names[0]
        # The model, not the URL: a teacher that moved to another host (or port) still continues the same file.
        job = PartialFile(output, {**settings, "teacher_model": model_name}, g.samples_per_prompt, log)
        teacher = EndpointTeacher(client, model_name, g, recipe.training.seed)
        todo = [p for p in prompts if p.index not in job.done]
        every = max(1, len(prompts) // 10)
        log(f"generate: {len(todo)} prompts to {model_name} at {t.endpoint} ({g.concurrency} at a time)")
        try:
            with ThreadPoolExecutor(max_workers=g.concurrency) as pool:
                pending = {pool.submit(teacher.complete, p): p for p in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    failed = [f for f in finished if f.exception() is not None]
                    for future in finished:
                        prompt = pending.pop(future)
                        if future.exception() is None:
                            job.append([_row(prompt, s, fields) for s, fields in enumerate(future.result())])
                            _progress(log, show_progress, len(job.done), len(prompts), every)
                    if failed:
                        # Stop quickly: no new requests, waiting retries give up; finished prompts stay saved.
                        client.stopping.set()
                        for other in pending:
                            other.cancel()
                        raise failed[0].exception()
        except BaseException:
            job.close()
            raise
    return _finish_run(job, output, prompts, g, log)
