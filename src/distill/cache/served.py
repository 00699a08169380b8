"""A teacher behind an OpenAI-compatible server (vLLM, SGLang, `distill serve`) as a source of prompt log-probs:
`distill cache` from `teacher.endpoint`, and online or on-policy training from it (`distill.train.served`).

One request per sequence, its token ids sent as the prompt (no re-tokenization), `max_tokens` 1, and either
- vLLM's ``prompt_logprobs: k`` (an extra field of /v1/completions): per prompt position a dict
  ``{"id": {"logprob", "rank", "decoded_token"}}`` holding the top k *and* the prompt's own token, so k entries
  when that token is among the top k and k + 1 otherwise; or
- ``echo: true`` + ``logprobs: k`` (the legacy OpenAI way): per position ``{token: logprob}``, again the top k plus
  the prompt's own token (OpenAI: "up to logprobs + 1"), tokens as ``token_id:N`` with
  ``return_tokens_as_token_ids``.
Position i (i ≥ 1) describes the teacher's distribution of token i given the tokens before it; an extra entry
for the prompt's own token is dropped, so every position gives exactly the top k, most probable first and tied
log-probs (frequent in bf16) by id, so both ways of asking store the same bytes. ``teacher.endpoint_logprobs:
auto`` asks for prompt_logprobs first and falls back to echo when the server refuses or ignores it.

The limits of a server, checked on the first request with one line naming the key to change: vLLM returns at
most ``--max-logprobs`` entries per token (20 by default), so ``cache.top_k`` must not exceed it; the longest
example plus the one token asked for must fit the server's ``max_model_len``. The log-probs are the model's raw
ones at temperature 1 (vLLM's default ``logprobs_mode``), as a cache stores them; the objective's τ is applied in
the loss. Nothing else of the distribution is known: the rest mass is 1 − Σ top-k (clamped at 1e-6), with no tail
draws and no √p sum of the tail (training at τ ≠ 1 assumes a flat tail, as for `cache.source=generated`).

The teacher is known by what the server says of its model: the id and the stable fields of its /v1/models card
(vLLM's `root`, `parent`, `max_model_len`), hashed. The server's tokenizer is checked against the recipe's through
vLLM's /tokenize where the server has it. A deterministic server (`distill serve`; vLLM at a fixed batch
composition) gives the same answer to the same request, which is what makes a resumed build byte-identical and a
resumed online run exact; vLLM's batched kernels may differ in the last bits between batch compositions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distill.cache.generated import _TokenIds, log_rest_of
from distill.data import Example
from distill.errors import DistillError
from distill.generate.client import EndpointClient, EndpointRefused

MODES = ("prompt_logprobs", "echo")
# The fields of a /v1/models card that describe the model rather than the server process (vLLM's `created` and
# `permission` change at every start).
_CARD_FIELDS = ("id", "root", "parent", "max_model_len", "owned_by")
_TOKEN_ID_PREFIX = "token_id:"


class _Ignored(Exception):
    """The server answered without the log-probs asked for (it ignored the parameter)."""


def check_served_recipe(recipe, building: bool = True) -> None:
    """Settings a server's top-k log-probs cannot serve, refused with one line naming the key; `building`: for
    `distill cache` (what it stores), else for training online (only data.packing matters)."""
    c, d = recipe.cache, recipe.data
    if building and c.representation != "top_k":
        raise DistillError(
            f"recipe key cache.representation: a server returns its top-k log-probs; {c.representation} needs "
            "draws from the teacher's full distribution (use top_k)"
        )
    if building and c.tail_samples:
        raise DistillError(
            "recipe key cache.tail_samples: a server returns only its top-k log-probs, no tail to draw from; set 0"
        )
    if d.packing:
        raise DistillError(
            "recipe key data.packing: a server scores each sequence as one document, while packed blocks keep their "
            "documents apart; set data.packing=false"
        )


def endpoint_client(t, g, log: Callable[[str], None]) -> EndpointClient:
    """The HTTP client for a teacher section's endpoint `t`, with generate's client settings `g` (concurrency,
    timeout, retries)."""
    return EndpointClient(
        t.endpoint,
        api_key=os.environ.get(t.api_key_env) or None,
        timeout_s=g.timeout_s,
        max_retries=g.max_retries,
        backoff_s=g.backoff_s,
        concurrency=g.concurrency,
        log=log,
    )


class ServedTeacher:
    """The top-k prompt log-probs of sequences, from one model at an OpenAI-compatible server.

    `check` (once, before anything is written or trained) settles how to ask and checks the server's limits;
    `example_top_k` scores one example; `in_order` scores many, `concurrency` requests in flight, in order.
    Safe to call from several threads (the client is).
    """

    def __init__(self, t, g, tokenizer, top_k: int, log: Callable[[str], None] = print):
        """`t`: the teacher section (endpoint, model_name, api_key_env, endpoint_logprobs); `g`: the generate
        section (the client's concurrency, timeout and retries)."""
        self.tokenizer, self.vocab_size, self.top_k, self.log = tokenizer, len(tokenizer), top_k, log
        self.concurrency = g.concurrency
        self.client = endpoint_client(t, g, log)
        self.url = self.client.base_url
        self.mode = None if t.endpoint_logprobs == "auto" else t.endpoint_logprobs
        self._to_id = _TokenIds(tokenizer)
        try:
            self.model_name, self.card = self._model_card(t.model_name)
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def _model_card(self, wanted: str | None) -> tuple[str, dict]:
        body = self.client.request("GET", "/models")
        cards = [c for c in (body.get("data") or []) if isinstance(c, dict) and isinstance(c.get("id"), str)]
        if not cards:
            raise DistillError(f"endpoint {self.url}/models lists no model; set teacher.model_name")
        if wanted is None:
            return cards[0]["id"], cards[0]
        card = next((c for c in cards if c["id"] == wanted), None)
        if card is None:
            names = ", ".join(c["id"] for c in cards)
            raise DistillError(f"recipe key teacher.model_name: {wanted!r} is not served at {self.url} ({names})")
        return wanted, card

    def identity(self) -> dict:
        """The manifest's record of the teacher: the endpoint, the model id, its card and their hash."""
        card = {k: self.card[k] for k in _CARD_FIELDS if self.card.get(k) is not None}
        digest = hashlib.sha256(json.dumps({"served": card}, sort_keys=True).encode()).hexdigest()
        return {"endpoint": self.url, "model_name": self.model_name, "card": card, "hash": digest}

    # ------------------------------------------------------------ the first request

    def check(self, examples: Sequence[Example], top_k_key: str = "cache.top_k", longest: int | None = None) -> None:
        """Settle the request mode and check the server's limits on the first example; one-line errors. `longest`:
        the longest sequence that will be sent (default: the longest example)."""
        longest = max([len(e.input_ids) for e in examples] + [longest or 0])
        context = self.card.get("max_model_len")
        if isinstance(context, int) and longest + 1 > context:
            raise DistillError(
                f"recipe key data.max_length: sequences of {longest} tokens plus the one token asked for "
                f"(max_tokens 1) exceed the max_model_len {context} of {self.model_name} at {self.url}"
            )
        self._check_tokenizer(examples[0])
        modes = [self.mode] if self.mode else list(MODES)
        for n, mode in enumerate(modes):
            try:
                self._score(examples[0].input_ids, mode, top_k_key)
            except (EndpointRefused, _Ignored) as e:
                detail = e.detail if isinstance(e, EndpointRefused) else str(e)
                if n + 1 < len(modes):
                    self.log(f"endpoint: {mode} not available ({detail}); asking with {modes[n + 1]} instead")
                    continue
                if isinstance(e, EndpointRefused) and "logprob" in detail.lower():
                    raise DistillError(
                        f"recipe key {top_k_key}: {self.url} refuses {self.top_k} log-probs per token ({detail}); "
                        "vLLM returns at most --max-logprobs (20 by default): lower it or restart the server"
                    ) from None
                raise DistillError(f"teacher.endpoint {self.url}: no prompt log-probs ({detail})") from None
            self.mode = mode
            return

    def _check_tokenizer(self, example: Example) -> None:
        """The server's tokenizer against the recipe's, on the first example's text (vLLM's /tokenize)."""
        text = self.tokenizer.decode(example.input_ids, skip_special_tokens=True)
        root = self.url.removesuffix("/v1")
        try:
            body = self.client.request(
                "POST", f"{root}/tokenize", {"model": self.model_name, "prompt": text, "add_special_tokens": False}
            )
        except EndpointRefused:
            self.log(f"endpoint: {root}/tokenize is not available; the server's tokenizer is not checked")
            return
        theirs = body.get("tokens")
        ours = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(theirs, list) and theirs != ours:
            same = [a == b for a, b in zip(theirs, ours, strict=False)]
            at = same.index(False) if False in same else len(same)
            raise DistillError(
                f"teacher.endpoint {self.url}: {self.model_name}'s tokenizer differs from the recipe's (the first "
                f"example's text gives other token ids from token {at} on); logit distillation needs one tokenizer"
            )

    # ------------------------------------------------------------ scoring

    def score(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (T-1, k) int64, log-probs (T-1, k) float32) of a sequence of T tokens: row i is the teacher's top k
        for token i + 1 given tokens 0..i, most probable first."""
        if self.mode is None:
            raise AssertionError("ServedTeacher.check must run first")  # pragma: no cover
        return self._score(ids, self.mode, "cache.top_k")

    def example_top_k(self, example: Example) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (n, k), log-probs (n, k) float32, log rest (n,) float32) at the example's n loss tokens, in order."""
        ids, lp = self.score(example.input_ids)  # (T-1, k) each
        counted = np.asarray(example.loss_mask[1:], dtype=np.bool_)  # (T-1,) row i predicts token i + 1
        return ids[counted], lp[counted], log_rest_of(lp[counted])

    def in_order(
        self, examples: Sequence[Example], indices: Sequence[int]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(index, *example_top_k) for `indices`, in that order, with `concurrency` requests in flight (a window
        of twice as many submitted): the server batches them, the results come back in order."""
        todo = iter(indices)
        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            try:
                for j in itertools.islice(todo, 2 * self.concurrency):
                    pending.append((j, pool.submit(self.example_top_k, examples[j])))
                while pending:
                    j, future = pending.popleft()
                    result = future.result()
                    following = next(todo, None)
                    if following is not None:
                        pending.append((following, pool.submit(self.example_top_k, examples[following])))
                    yield (j, *result)
            except BaseException:
                self.client.stopping.set()  # waiting retries give up: the run is failing or stopped
                for _, other in pending:
                    other.cancel()
                raise

    def _score(self, ids: Sequence[int], mode: str, top_k_key: str) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in ids]
        body: dict = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        if mode == "prompt_logprobs":
            body["prompt_logprobs"] = self.top_k
        else:
            body.update(echo=True, logprobs=self.top_k, return_tokens_as_token_ids=True)
        answer = self.client.post("/completions", body)
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise DistillError(f"endpoint {self.url}/completions: the answer has no choices")
        positions = self._positions(choices[0], ids, mode)
        out_ids = np.empty((len(ids) - 1, self.top_k), dtype=np.int64)  # (T-1, k)
        out_lp = np.empty((len(ids) - 1, self.top_k), dtype=np.float32)  # (T-1, k)
        for i, entries in enumerate(positions):
            out_ids[i], out_lp[i] = self._top_k_of(entries, ids[i + 1], i + 1, top_k_key)
        return out_ids, out_lp

    def _positions(self, choice: dict, ids: list[int], mode: str) -> list[list[tuple[int, float]]]:
        """Per position 1..T-1 of the prompt: its (id, log-prob) entries as the server gave them."""
        if mode == "prompt_logprobs":
            given = choice.get("prompt_logprobs")
            if not isinstance(given, list):
                raise _Ignored("the answer has no prompt_logprobs")
            if len(given) != len(ids):
                raise DistillError(f"endpoint {self.url}: {len(given)} prompt_logprobs for {len(ids)} prompt tokens")
            return [self._entries(d, i) for i, d in enumerate(given[1:], 1)]
        logprobs = choice.get("logprobs")
        given = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(given, list):
            raise _Ignored("the answer has no logprobs.top_logprobs")
        if len(given) < len(ids):
            raise _Ignored(f"{len(given)} log-prob positions for {len(ids)} prompt tokens (echo ignored?)")
        return [self._entries(d, i) for i, d in enumerate(given[1 : len(ids)], 1)]

    def _entries(self, given, position: int) -> list[tuple[int, float]]:
        if not isinstance(given, dict) or not given:
            raise DistillError(f"endpoint {self.url}: no log-probs at prompt position {position}")
        entries = []
        for key, value in given.items():
            if isinstance(value, dict):  # vLLM's prompt_logprobs: {"logprob", "rank", "decoded_token"}
                value = value.get("logprob")
            try:
                entries.append((self._token_id(key), float(value)))
            except (TypeError, ValueError) as e:
                raise DistillError(f"endpoint {self.url}: prompt position {position}: {e}") from None
        return entries

    def _token_id(self, key: str) -> int:
        if key.startswith(_TOKEN_ID_PREFIX):
            key = key[len(_TOKEN_ID_PREFIX) :]
        token = int(key) if key.isdigit() else key  # prompt_logprobs' keys are ids; echo's "token_id:N" or text
        return self._to_id(token)

    def _top_k_of(self, entries, actual: int, position: int, top_k_key: str) -> tuple[list[int], list[float]]:
        k = self.top_k
        if len(entries) == k + 1:  # the prompt's own token, outside the top k, came along
            entries = [e for e in entries if e[0] != actual]
        if len(entries) < k:
            raise DistillError(
                f"recipe key {top_k_key}: {self.url} returned {len(entries)} log-probs per token, {top_k_key} asks "
                f"for {k}; a server returns at most its limit (vLLM: --max-logprobs, 20 by default)"
            )
        if len(entries) != k or len({e[0] for e in entries}) != k:
            raise DistillError(
                f"endpoint {self.url}: prompt position {position} has {len(entries)} log-probs (or a repeated token) "
                f"for top {k} and the prompt's token"
            )
        entries = sorted(entries, key=lambda e: (-e[1], e[0]))  # most probable first, ties by id: one canonical order
        return [e[0] for e in entries], [e[1] for e in entries]
