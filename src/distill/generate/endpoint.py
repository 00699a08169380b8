"""An OpenAI-compatible teacher: requests built from the recipe, answers turned into completion fields.

The HTTP side (retries, backoff, Retry-After) is `distill.generate.client`.
"""

from __future__ import annotations

import re

from distill.errors import DistillError
from distill.generate.local import derived_seed
from distill.generate.prompts import Prompt

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


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
            path, body = self._body(prompt, missing, derived_seed(self.seed, prompt.index, len(choices)))
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
