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

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from distill.errors import DistillError
from distill.generate.endpoint import EndpointTeacher
from distill.generate.local import Completion, derived_seed, local_plan, sample_completions
from distill.generate.partial import PartialFile
from distill.generate.prompts import Prompt, encode_prompt, prompts_fingerprint, read_prompts
from distill.models import pick_device
from distill.sampling import eos_ids


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
    device = pick_device(recipe.training.device, "recipe key training.device")
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
        plan = local_plan(prompt_ids, g.batch_size)
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
                    seed=derived_seed(recipe.training.seed, "batch", number),
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
