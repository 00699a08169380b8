"""Greedy continuations: the eval prompts every generation check continues, and exact match on a prompt/answer file."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.data import Example, pad_id_of, read_rows
from distill.errors import DistillError
from distill.report.speed import model_device
from distill.sampling import decode, eos_ids


def eval_prompts(examples: Sequence[Example], count: int, prompt_tokens: int) -> list[list[int]]:
    """Up to `count` prompts spread evenly over the eval examples (the same ones for every model).

    A row with a prompt (tokens before its first counted target: prompt/completion or chat rows) gives its last
    `prompt_tokens` prompt tokens; a text row (everything counted) its first `prompt_tokens` tokens, at most half of
    it, so the model continues real text."""
    if count < 1 or not examples:
        return []
    step = max(1, len(examples) // count)
    prompts = []
    for example in list(examples)[::step][:count]:
        ids, mask = example.input_ids, example.loss_mask
        first_target = next((i for i in range(1, len(ids)) if mask[i]), len(ids))
        if first_target > 1:
            prompts.append(list(ids[:first_target][-prompt_tokens:]))
        else:
            prompts.append(list(ids[: max(1, min(prompt_tokens, len(ids) // 2))]))
    return prompts


def normalize_answer(text: str) -> str:
    """Exact-match normalization: strip the ends and collapse every whitespace run to one space."""
    return " ".join(text.split())


def read_generation_rows(source: str) -> list[dict]:
    """Rows of a generation task: {"prompt": str, "answer": str} ("completion" is accepted for "answer")."""
    rows = []
    for where, row in read_rows(source):
        if isinstance(row, Exception):
            raise DistillError(f"bad generation row at {where}: {row}")
        answer = row.get("answer", row.get("completion")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(answer, str):
            raise DistillError(f'bad generation row at {where}: needs "prompt" and "answer" strings')
        rows.append({"prompt": row["prompt"], "answer": answer})
    if not rows:
        raise DistillError(f"generation file {source} has no rows")
    return rows


class _SecondNewline:
    """A transformers stopping criterion: the row has generated two newlines (the end of the prompt's last line,
    then the predicted line), so nothing after it can change the comparison."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :].tolist(), skip_special_tokens=True)
        return torch.tensor([t.count("\n") >= 2 for t in texts], device=input_ids.device)


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    rows: Sequence[dict],
    max_length: int,
    extra_tokens: int = 16,
    next_line: bool = False,
    keep_outputs: bool = False,
) -> dict:
    """Greedy-decode each prompt (batch 1, stops at EOS or after the answer's token count + `extra_tokens`)
    and compare the normalized continuation with the normalized answer.

    `next_line=True` is line completion: each prompt ends where a line does (without its newline), decoding stops
    once the next line is complete, and only that line is compared (a code model never stops after one line by
    itself). `keep_outputs=True` also returns "completions": every row's output and match, in row order, so a
    caller can show them without decoding again.

    Through `distill.sampling.decode`: greedy is plain greedy whatever the model folder's generation_config.json
    says (a checkpoint's repetition penalty or min_new_tokens would change the answer), and no padded embedding
    row past the tokenizer is ever chosen."""
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids(model, tokenizer)
    completions = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"][-max_length:]
        answer_tokens = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
        output = decode(
            model,
            [prompt],
            max_new_tokens=answer_tokens + extra_tokens,
            eos_ids=eos,
            pad_id=pad_id,
            vocab_size=len(tokenizer),
            stopping_criteria=[_SecondNewline(tokenizer, len(prompt))] if next_line else None,
            device=device,
        )
        text = tokenizer.decode(output.new_ids[0].tolist(), skip_special_tokens=True)
        if next_line:  # the prompt ends where the previous line does: its first newline starts the predicted line
            lines = text.split("\n")
            text = lines[1] if len(lines) > 1 else ""
        completions.append({"output": text, "match": normalize_answer(text) == normalize_answer(row["answer"])})
    samples = [{"prompt": r["prompt"], "answer": r["answer"], **c} for r, c in zip(rows[:5], completions, strict=False)]
    result = {
        "exact_match": sum(c["match"] for c in completions) / max(len(rows), 1),
        "generation_rows": len(rows),
        "generation_samples": samples,
    }
    return {**result, "completions": completions} if keep_outputs else result
