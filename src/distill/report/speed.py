"""How fast and how big a model is: prefill and decode throughput, peak memory, parameters, size on disk.

Timing method (the same for every model, so ratios to the teacher are fair):

- Inputs are random token ids (seeded), `prompt_tokens` long, in batches of 1 and of `batch_size`.
- **Prefill** = one forward over the whole prompt with the KV cache on; tokens/s = batch × prompt_tokens / time.
- **Decode** = a manual greedy loop of exactly `new_tokens` single-token steps feeding the KV cache back,
  so no end-of-sequence token can stop it early; tokens/s = batch × new_tokens / time of the loop. Its tokens
  are only fed back, never read, so it is the one loop that does not go through `distill.sampling.decode`:
  `generate` adds a constant of Python work per step (about 1.5 ms on a CPU, on the demo's teacher at 35 ms a step
  and student at 16 ms), which shrinks every speed-up toward 1 (the demo's 2.17x read 2.02x) and times
  transformers' loop rather than the model. Like `decode`, it picks only ids below `vocab_size` (the tokenizer's),
  so padded embedding rows are never fed.
- Each setting runs `warmup` untimed times, then `runs` timed times; the median is reported. On CUDA the
  device is synchronized before every clock read.

Peak memory is the bytes the model's weights occupy (parameters and buffers, counted exactly) plus the peak
extra memory of the largest-batch timing run: on CUDA `torch.cuda.max_memory_allocated` above what was
allocated before the run (exact at the allocator level and unaffected by other processes); on CPU the peak
resident set size (RSS) above the RSS before the run, sampled every 5 ms from /proc/self/statm. CPU
RSS is only approximate: the C allocator keeps freed memory, so memory released by an earlier model may be
reused without raising RSS. Weights are counted directly rather than through RSS because memory-mapped
safetensors pages make RSS of loaded weights ambiguous.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.models import max_context

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class SpeedSettings:
    """How much timing work to do; the defaults take seconds on tiny models and stay meaningful on real ones."""

    runs: int = 3  # timed repetitions per setting; the median is reported
    warmup: int = 1  # untimed repetitions first (kernel selection, allocator warm-up)
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_size: int = 8  # the larger batch, timed besides batch 1

    @classmethod
    def quick(cls) -> SpeedSettings:
        return cls(runs=1, warmup=1, prompt_tokens=32, new_tokens=8, batch_size=4)


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers as they sit in memory now (in the model's current dtype)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def size_on_disk(folder: str | Path) -> int | None:
    """Sum of the weight files in a model folder; None for a hub id or a folder without weight files."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return None
    files = [p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in files) if files else None


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _RssPeak:
    """Samples RSS in a background thread; `.peak` is the largest value seen (None where /proc is missing)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        rss = _rss_bytes()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)
        return False


def _cache_keyword(model) -> str:
    """transformers 5 names the KV-cache argument `cache`; 4.x calls it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def _prefill_and_decode(
    model, prompt: torch.Tensor, new_tokens: int, vocab_size: int | None = None
) -> tuple[float, float]:
    """Seconds for the prefill forward and for `new_tokens` greedy decode steps. prompt (B, P) long; the greedy
    choice is over ids < `vocab_size` (None = every row of the head)."""
    device = prompt.device
    keyword = _cache_keyword(model)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    next_ids = out.logits[:, -1:, :vocab_size].argmax(-1)  # (B, 1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    cache = _cache_of(out)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, use_cache=True, **{keyword: cache})
        cache = _cache_of(out)
        next_ids = out.logits[:, -1:, :vocab_size].argmax(-1)  # (B, 1)
    _sync(device)
    return prefill_s, time.perf_counter() - start


def measure_speed(model, vocab_size: int, settings: SpeedSettings | None = None, seed: int = 0) -> dict:
    """Median prefill and decode tokens/s at batch 1 and `settings.batch_size`, and peak memory.

    Returns {"batches": [{"batch_size", "prefill_tokens_per_s", "decode_tokens_per_s"}, ...],
    "weights_memory_bytes", "peak_memory_bytes", "memory_method"}.
    """
    settings = settings or SpeedSettings()
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    results = []
    peak_extra = 0
    batch_sizes = sorted({1, max(1, settings.batch_size)})
    prompt_tokens, new_tokens = settings.prompt_tokens, settings.new_tokens
    context = max_context(model.config)
    if context is not None and prompt_tokens + new_tokens > context:
        # Keep the timed sequence inside the model's positions; shorten the prompt, not the decode.
        new_tokens = min(new_tokens, context // 2)
        prompt_tokens = context - new_tokens
    for batch in batch_sizes:
        prompt = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=generator).to(device)
        largest = batch == batch_sizes[-1]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        # Memory is watched from before the warm-up: the first run is the one that grows the allocator.
        sampler = _RssPeak() if device.type != "cuda" and largest else None
        rss_before = _rss_bytes()
        prefill, decode = [], []
        with sampler or contextlib.nullcontext():
            for _ in range(settings.warmup):
                _prefill_and_decode(model, prompt, new_tokens, vocab_size)
            for _ in range(max(1, settings.runs)):
                p, d = _prefill_and_decode(model, prompt, new_tokens, vocab_size)
                prefill.append(p)
                decode.append(d)
        if largest:
            if device.type == "cuda":
                peak_extra = torch.cuda.max_memory_allocated(device) - before
            elif sampler is not None and sampler.peak is not None and rss_before is not None:
                peak_extra = max(0, sampler.peak - rss_before)
        results.append(
            {
                "batch_size": batch,
                "prefill_tokens_per_s": batch * prompt_tokens / max(statistics.median(prefill), 1e-9),
                "decode_tokens_per_s": batch * new_tokens / max(statistics.median(decode), 1e-9),
            }
        )
    model.train(was_training)
    weights = weight_bytes(model)
    return {
        "batches": results,
        "weights_memory_bytes": weights,
        "peak_memory_bytes": weights + peak_extra,
        "memory_method": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta",
        "device": str(device),
        "settings": {
            "runs": settings.runs,
            "warmup": settings.warmup,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
        },
    }
