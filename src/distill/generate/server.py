"""`distill serve MODEL_DIR`: one local transformers model behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` with the OpenAI request
and response shapes (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``; ``logprobs`` as an
int on completions and ``logprobs`` + ``top_logprobs`` on chat; ``echo`` + ``logprobs`` for the prompt's own
log-probs; prompts as text or token ids; vLLM's ``top_k``, ``return_tokens_as_token_ids`` and ``prompt_logprobs``
extensions), and vLLM's ``POST /tokenize``. Log-probs are the model's raw ones at temperature 1, as vLLM reports
them; ``prompt_logprobs: k`` answers in vLLM's shape: per prompt position (None for the first) a dict
``{"id": {"logprob", "rank", "decoded_token"}}`` of the prompt's own token (its rank in the vocabulary) and the top
k (ranks 1..k), k or k + 1 entries. At most 20 log-probs per token, vLLM's default ``--max-logprobs``. Bad requests
get a 400 in OpenAI's error shape.

This is a reference server: it lets a teacher live on another machine and lets the HTTP path of
`distill generate` be tested against a real server. It runs one generation at a time. For production throughput
point `teacher.endpoint` at vLLM or SGLang, which speak the same API.

Needs the `serve` extra (FastAPI + uvicorn).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.

import socket
import threading
import time
import uuid
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from distill.errors import DistillError
from distill.generate.local import Completion, sample_completions
from distill.models import pick_device

# Log-probs per token a request may ask for: vLLM's default --max-logprobs.
MAX_LOGPROBS = 20
PRODUCTION_NOTE = "a reference server, one request at a time: for production, point teacher.endpoint at vLLM or SGLang"


def _import_server():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise DistillError("distill serve needs FastAPI and uvicorn: pip install distill[serve]") from None
    return fastapi, uvicorn


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


# ---------------------------------------------------------------- request shapes


class _SamplingRequest(BaseModel):
    # Unknown fields are ignored, as vLLM does: clients send e.g. `user` or `stream_options` freely.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="vLLM extension; -1 or 0 = no limit")
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM extension")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts mean anything to a text model
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---------------------------------------------------------------- the model behind the API


class ServedModel:
    """The model, its tokenizer and a lock: one request at a time keeps memory and seeding simple (and a Rust
    tokenizer shared between threads can fail with "Already borrowed")."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.vocab = len(tokenizer)
        self.lock = threading.RLock()
        from distill.models import max_context

        self.context = max_context(model.config)

    def token_text(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise BadRequest(f"The model `{requested}` does not exist.", "model", 404, "NotFoundError")

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise BadRequest("the prompt is empty", "prompt")
        if self.context is not None and prompt_tokens + max_tokens > self.context:
            raise BadRequest(
                f"This model's maximum context length is {self.context} tokens; the prompt has {prompt_tokens} "
                f"and {max_tokens} more were requested",
                "max_tokens",
            )

    def sample(
        self, prompts: list[list[int]], request, max_tokens: int, logprobs: int | None
    ) -> list[list[Completion]]:
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if max_tokens == 0:
            return [[Completion("", [], "length", [], []) for _ in range(request.n)] for _ in prompts]
        with self.lock:
            return sample_completions(
                self.model,
                self.tokenizer,
                prompts,
                n=request.n,
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=max(request.top_k, 0),
                stop=stop,
                logprobs=logprobs,
                seed=request.seed,
            )

    @torch.no_grad()
    def prompt_logprobs(
        self, ids: list[int], k: int
    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None], list[int | None]]:
        """Log-prob of each prompt token given the ones before it (None for the first), the top k there, and the
        token's rank in the vocabulary (vLLM's: how many tokens are at least as likely, itself included)."""
        with self.lock:
            device = next(self.model.parameters()).device
            logits = self.model(torch.tensor([ids], device=device)).logits[0, :, : self.vocab]  # (T, V)
            lp = torch.log_softmax(logits.float(), dim=-1)[:-1]  # (T-1, V): row i predicts token i+1
            chosen = lp.gather(1, torch.tensor(ids[1:], device=device)[:, None])  # (T-1, 1)
            ranks = (lp >= chosen).sum(-1).tolist()  # (T-1,)
            values, indices = lp.topk(min(max(k, 1), self.vocab), dim=-1)  # (T-1, k)
        tops = [list(zip(i, v, strict=True))[:k] for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        return [None, *chosen[:, 0].tolist()], [None, *tops], [None, *ranks]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_logprobs(served: ServedModel, ids, chosen, tops, k: int, as_ids: bool, text_start: int) -> dict:
    """The legacy /v1/completions `logprobs` object for a run of tokens."""
    tokens = [served.token_text(t, as_ids) for t in ids]
    top_dicts: list[dict | None] = []
    for token, lp, top in zip(ids, chosen, tops, strict=True):
        if top is None:
            top_dicts.append(None)
            continue
        entries = {served.token_text(i, as_ids): v for i, v in top[:k]}
        if k > 0:
            # OpenAI: the produced token is always included, so a dict may hold k+1 entries.
            entries.setdefault(served.token_text(token, as_ids), lp)
        top_dicts.append(entries)
    offsets, position = [], text_start
    for t in ids:
        offsets.append(position)
        position += len(served.tokenizer.decode([t]))
    return {"tokens": tokens, "token_logprobs": list(chosen), "top_logprobs": top_dicts, "text_offset": offsets}


def _vllm_prompt_logprobs(served: ServedModel, ids, chosen, tops, ranks, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` of a prompt: per position the prompt's own token first (its vocabulary rank), then
    the top k (ranks 1..k); the token, when among them, keeps its first place with the top-k entry's values."""

    def entry(token: int, lp: float, rank: int) -> dict:
        return {"logprob": max(lp, -9999.0), "rank": rank, "decoded_token": served.tokenizer.decode([token])}

    out: list[dict | None] = [None]
    for token, lp, top, rank in zip(ids[1:], chosen[1:], tops[1:], ranks[1:], strict=True):
        position = {str(token): entry(token, lp, rank)}
        for r, (i, v) in enumerate(top[:k], 1):
            position[str(i)] = entry(i, v, r)
        out.append(position)
    return out


def completions(served: ServedModel, request: CompletionRequest) -> dict:
    served.check_model(request.model)
    if request.stream:
        raise BadRequest("stream=true is not supported by distill serve", "stream")
    prompt = request.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("the prompt is empty", "prompt")
    prompt_ids = []
    for p in prompt:
        ids = list(served.tokenizer(p, add_special_tokens=True)["input_ids"]) if isinstance(p, str) else list(p)
        if any(i < 0 or i >= served.vocab for i in ids):
            raise BadRequest(f"prompt token ids must be in [0, {served.vocab})", "prompt")
        served.check_length(len(ids), request.max_tokens)
        prompt_ids.append(ids)
    if request.max_tokens == 0 and not request.echo:
        raise BadRequest("max_tokens=0 only makes sense with echo=true", "max_tokens")
    k = request.logprobs
    # As vLLM: echo with logprobs brings the prompt's log-probs at the same k.
    prompt_k = request.prompt_logprobs if request.prompt_logprobs is not None or not request.echo else k
    results = served.sample(prompt_ids, request, request.max_tokens, k)
    choices = []
    for p, (text_in, ids) in enumerate(zip(prompt, prompt_ids, strict=True)):
        prompt_text = text_in if isinstance(text_in, str) else served.tokenizer.decode(ids)
        scored = None
        if prompt_k is not None or (request.echo and k is not None):
            scored = served.prompt_logprobs(ids, max(prompt_k or 0, k or 0))  # (chosen, tops, ranks)
        echo_lp = scored[:2] if request.echo and k is not None else None
        prompt_lp = None if prompt_k is None else _vllm_prompt_logprobs(served, ids, *scored, prompt_k)
        for j, c in enumerate(results[p]):
            text = (prompt_text if request.echo else "") + c.text
            logprobs = None
            if k is not None:
                as_ids = request.return_tokens_as_token_ids
                tops = c.top_logprobs or [[] for _ in c.token_ids]
                logprobs = _completion_logprobs(
                    served, c.token_ids, c.token_logprobs, tops, k, as_ids, len(prompt_text) if request.echo else 0
                )
                if echo_lp is not None:
                    head = _completion_logprobs(served, ids, echo_lp[0], echo_lp[1], k, as_ids, 0)
                    logprobs = {key: head[key] + logprobs[key] for key in logprobs}
            choices.append(
                {
                    "index": p * request.n + j,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "prompt_logprobs": prompt_lp,
                }
            )
    completion_tokens = sum(len(c.token_ids) for r in results for c in r)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": choices,
        "usage": _usage(sum(len(ids) for ids in prompt_ids), completion_tokens),
    }


def chat_completions(served: ServedModel, request: ChatRequest) -> dict:
    served.check_model(request.model)
    if request.stream:
        raise BadRequest("stream=true is not supported by distill serve", "stream")
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
    tokenizer = served.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks (roles, order) raise plain exceptions
        raise BadRequest(f"the chat template rejects these messages: {e}", "messages") from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:  # as vLLM: the rest of the context
        max_tokens = max(1, min(4096, (served.context or len(ids) + 256) - len(ids)))
    served.check_length(len(ids), max_tokens)
    k = (request.top_logprobs or 0) if request.logprobs else None
    results = served.sample([ids], request, max_tokens, k)[0]
    as_ids = request.return_tokens_as_token_ids

    def entry(token: int, lp: float) -> dict:
        token_text = served.token_text(token, as_ids)
        return {"token": token_text, "logprob": lp, "bytes": list(token_text.encode("utf-8"))}

    choices = []
    for j, c in enumerate(results):
        logprobs = None
        if k is not None:
            tops = c.top_logprobs or [[] for _ in c.token_ids]
            content = []
            for token, lp, top in zip(c.token_ids, c.token_logprobs, tops, strict=True):
                content.append({**entry(token, lp), "top_logprobs": [entry(i, v) for i, v in top[:k]]})
            logprobs = {"content": content}
        choices.append(
            {
                "index": j,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": choices,
        "usage": _usage(len(ids), sum(len(c.token_ids) for c in results)),
    }


# ---------------------------------------------------------------- the app


def _error_body(message: str, kind: str, param: str | None, code) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(served: ServedModel):
    """The FastAPI app. Handlers are sync: FastAPI runs them in its thread pool, and the model lock serializes them."""
    fastapi, _ = _import_server()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="distill serve", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRequest)
    def _bad_request(request, exc: BadRequest):
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(_error_body(message, "invalid_request_error", param, 400), status_code=400)

    @app.exception_handler(HTTPException)
    def _http(request, exc: HTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(exc.detail), kind, None, exc.status_code), status_code=exc.status_code)

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "distill"}
        if served.context is not None:
            card["max_model_len"] = served.context
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    def post_completions(request: CompletionRequest) -> dict:
        with served.lock:
            return completions(served, request)

    @app.post("/tokenize")
    def post_tokenize(request: TokenizeRequest) -> dict:
        served.check_model(request.model)
        with served.lock:
            tokens = list(served.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
        return {"count": len(tokens), "max_model_len": served.context, "tokens": tokens, "token_strs": None}

    @app.post("/v1/chat/completions")
    def post_chat(request: ChatRequest) -> dict:
        with served.lock:
            return chat_completions(served, request)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (the URL printed at start says which)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise DistillError(f"distill serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def build_server(app, log_level: str = "warning"):
    """A uvicorn server for `app`; run it with `.run(sockets=[bind(host, port)])`."""
    _, uvicorn = _import_server()
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))


def load_served_model(model_dir: str, name: str | None = None, dtype: str = "auto", device: str | None = None):
    from pathlib import Path

    from distill.models import load_model, load_tokenizer, resolve_dtype

    where = pick_device(device, "--device")
    tokenizer = load_tokenizer(model_dir, "model")
    model = load_model(model_dir, "model", resolve_dtype(dtype, where)).eval().requires_grad_(False).to(where)
    if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise DistillError(f"model {model_dir} has fewer output rows than its tokenizer has tokens")
    return ServedModel(model, tokenizer, name or Path(model_dir).expanduser().resolve().name)


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Run `distill serve` until interrupted."""
    _import_server()  # fail with the install hint before loading a model
    served = load_served_model(model_dir, name, dtype, device)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(f"distill serve: {served.name} at http://{shown}:{actual}/v1 ({PRODUCTION_NOTE})")
    build_server(create_app(served)).run(sockets=[sock])
