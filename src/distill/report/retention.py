"""Retention and speed-up: each model's report entry divided by the teacher's (1.0 = as good as the teacher)."""

from __future__ import annotations


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def retention_of(model: dict, teacher: dict) -> dict:
    """Share of the teacher's quality kept: m_model / m_teacher for higher-is-better metrics and
    CE_teacher / CE_model for lower-is-better ones (1.0 = as good as the teacher)."""
    result = {
        "top1_accuracy": _ratio(model["top1_accuracy"], teacher["top1_accuracy"]),
        "cross_entropy": _ratio(teacher["cross_entropy"], model["cross_entropy"]),
        "agreement": _ratio(model["agreement"], teacher["agreement"]),
        "bits_per_byte": _ratio(teacher.get("bits_per_byte"), model.get("bits_per_byte")),
    }
    if "exact_match" in model and "exact_match" in teacher:
        result["exact_match"] = _ratio(model["exact_match"], teacher["exact_match"])
    return result


def speedup_of(model: dict, teacher: dict) -> dict:
    """decode = model decode tok/s / teacher decode tok/s (batch 1); params = teacher params / model params."""
    result = {
        "decode": _ratio(model.get("decode_tokens_per_s"), teacher.get("decode_tokens_per_s")),
        "params": _ratio(teacher["params"], model["params"]),
        "prefill": _ratio(model.get("prefill_tokens_per_s"), teacher.get("prefill_tokens_per_s")),
        "size_on_disk": _ratio(teacher.get("size_on_disk_bytes"), model.get("size_on_disk_bytes")),
        "peak_memory": _ratio(teacher.get("peak_memory_bytes"), model.get("peak_memory_bytes")),
    }
    model_batches = {b["batch_size"]: b for b in model.get("speed", {}).get("batches", [])}
    for b in teacher.get("speed", {}).get("batches", []):
        if b["batch_size"] != 1 and b["batch_size"] in model_batches:
            mine = model_batches[b["batch_size"]]
            result[f"decode_batch_{b['batch_size']}"] = _ratio(mine["decode_tokens_per_s"], b["decode_tokens_per_s"])
    return result
