"""The retention report: report.json (the contract), report.md and one self-contained report.html, plus PNGs.

The HTML embeds its pictures as base64 data URIs, so it is a single static file that opens from disk with no
server; the same PNGs are written beside it for the Markdown report and for reuse. Every file is written
atomically (a killed run leaves the old report or the new one, never half of one).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from distill import atomic
from distill.metrics import read_metrics
from distill.report.judging import difficulty_figure, judging_tables
from distill.report.tasks import task_tables

RETENTION_PNG = "retention.png"
CURVES_PNG = "training_curves.png"
DIFFICULTY_PNG = "by_difficulty.png"

QUALITY_COLUMNS = [
    ("cross_entropy", "CE (nats/token)"),
    ("perplexity", "perplexity"),
    ("bits_per_byte", "bits/byte"),
    ("teacher_bits_per_byte", "teacher bits/byte, same bytes"),  # across tokenizers (distill.report.cross)
    ("top1_accuracy", "top-1 acc."),
    ("agreement", "agreement"),
    ("kl_to_teacher", "KL(teacher‖model)"),
    ("aligned_share", "1:1 share"),  # across tokenizers: where agreement and KL are measured
    ("exact_match", "exact match"),
]
COST_COLUMNS = [
    ("params", "parameters"),
    ("size_on_disk_bytes", "size on disk"),
    ("peak_memory_bytes", "peak memory"),
    ("prefill_tokens_per_s", "prefill tok/s (b=1)"),
    ("decode_tokens_per_s", "decode tok/s (b=1)"),
    ("prefill_tokens_per_s_batch", "prefill tok/s (b=N)"),
    ("decode_tokens_per_s_batch", "decode tok/s (b=N)"),
    ("dtype", "dtype"),
    ("device", "device"),
]
RETENTION_COLUMNS = [
    ("top1_accuracy", "top-1 acc."),
    ("cross_entropy", "cross-entropy"),
    ("agreement", "agreement"),
    ("bits_per_byte", "bits/byte"),
    ("exact_match", "exact match"),
]
SPEEDUP_COLUMNS = [
    ("decode", "decode (b=1)"),
    ("prefill", "prefill (b=1)"),
    ("params", "params"),
    ("size_on_disk", "size on disk"),
    ("peak_memory", "peak memory"),
]


# ---------------------------------------------------------------- formatting


def _bytes(value) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return str(value)  # pragma: no cover


def _number(key: str, value) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if key.endswith("_bytes"):
        return _bytes(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or key == "params":
        return f"{int(value):,}"
    if key.endswith("tokens_per_s") or key.endswith("tokens_per_s_batch"):
        return f"{value:,.1f}"
    if key in ("top1_accuracy", "agreement", "exact_match", "aligned_share"):
        return f"{value:.2%}"
    return f"{value:.4g}"


def _percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _batch_value(result: dict, key: str):
    """prefill/decode tokens/s at the largest timed batch, and that batch size."""
    batches = result.get("speed", {}).get("batches", [])
    if len(batches) < 2:
        return None, None
    return batches[-1].get(key), batches[-1]["batch_size"]


def _cost_cell(result: dict, key: str) -> str:
    if key.endswith("_batch"):
        value, batch = _batch_value(result, key.removesuffix("_batch"))
        return "–" if value is None else f"{value:,.1f} (b={batch})"
    return _number(key, result.get(key))


def _tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table, shared by the Markdown and HTML writers."""
    models = report["models"]
    names = list(models)
    quality_keys = [(k, label) for k, label in QUALITY_COLUMNS if any(k in models[n] for n in names)]
    tables = [
        (
            "Quality on the eval data",
            ["model", *[label for _, label in quality_keys]],
            [[n, *[_number(k, models[n].get(k)) for k, _ in quality_keys]] for n in names],
        ),
        (
            "Cost",
            ["model", *[label for _, label in COST_COLUMNS]],
            [[n, *[_cost_cell(models[n], k) for k, _ in COST_COLUMNS]] for n in names],
        ),
    ]
    retention = report.get("retention", {})
    if retention:
        keys = [(k, label) for k, label in RETENTION_COLUMNS if any(k in r for r in retention.values())]
        tables.append(
            (
                "Retention (share of the teacher's quality; 100% = as good as the teacher)",
                ["model", *[label for _, label in keys]],
                [[n, *[_percent(r.get(k)) for k, _ in keys]] for n, r in retention.items()],
            )
        )
    speedup = report.get("speedup", {})
    if speedup:
        tables.append(
            (
                "Speed-up and size reduction vs the teacher",
                ["model", *[label for _, label in SPEEDUP_COLUMNS]],
                [[n, *[_times(r.get(k)) for k, _ in SPEEDUP_COLUMNS]] for n, r in speedup.items()],
            )
        )
    spread_rows = []
    for n in names:
        p = models[n].get("kl_to_teacher_percentiles")
        if p is not None and n != "teacher":
            spread_rows.append(
                [n, *[f"{p[q]:.4g}" for q in ("p50", "p90", "p99")], _number("", models[n].get("kl_to_teacher_max"))]
            )
    if spread_rows:
        tables.append(
            ("Spread of KL(teacher ‖ model) over tokens (nats)", ["model", "p50", "p90", "p99", "max"], spread_rows)
        )
    return tables + judging_tables(report) + task_tables(report)


def _completion_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Line completions side by side (report["completion_examples"], written by `distill demo`): the context's last
    line, the true next line and every model's line, ✓ where it is an exact match."""
    shown = report.get("completion_examples")
    if not shown or not shown.get("examples"):
        return []
    names = list(shown["examples"][0]["completions"])
    rows = []
    for e in shown["examples"]:
        cells = [("✓ " if c["match"] else "") + c["output"].strip() for c in (e["completions"][n] for n in names)]
        rows.append([str(e["row"]), e["context_last_line"].strip(), e["answer"], *cells])
    exact = ", ".join(f"{n} {k}/{shown['rows']}" for n, k in shown["exact"].items())
    title = (
        f"Line completions side by side ({len(rows)} of {shown['rows']} rows: {shown['rule']}; ✓ = exact match; "
        f"exact on all rows: {exact})"
    )
    return [(title, ["row", "last line of the context", "true next line", *names], rows)]


def _divergent_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    for name, result in report["models"].items():
        rows = result.get("most_divergent_tokens") or []
        if not rows:
            continue
        tables.append(
            (
                f"Where {name} diverges most from the teacher",
                ["KL", "context", "target", "teacher's top-1", f"{name}'s top-1"],
                [
                    [
                        f"{r['kl']:.3f}",
                        repr(r["context"])[1:-1],
                        repr(r["token"])[1:-1],
                        repr(r["teacher_top1"])[1:-1],
                        repr(r["model_top1"])[1:-1],
                    ]
                    for r in rows
                ],
            )
        )
    return tables


# ---------------------------------------------------------------- pictures


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never a window, works with no display
    import matplotlib.pyplot as plt

    return plt


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def retention_chart(report: dict) -> bytes | None:
    """Grouped bars: one group per metric, one bar per model, a line at 100%."""
    plt = _pyplot()
    retention = report.get("retention") or {}
    if plt is None or not retention:
        return None
    keys = [(k, label) for k, label in RETENTION_COLUMNS if any(r.get(k) is not None for r in retention.values())]
    figure, axis = plt.subplots(figsize=(1.6 * len(keys) + 2.5, 3.6))
    width = 0.8 / len(retention)
    for i, (name, values) in enumerate(retention.items()):
        heights = [100.0 * (values.get(k) or 0.0) for k, _ in keys]
        positions = [j + (i - (len(retention) - 1) / 2) * width for j in range(len(keys))]
        bars = axis.bar(positions, heights, width, label=name)
        axis.bar_label(bars, fmt="%.0f%%", fontsize=7)
    axis.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    tallest = max([100.0 * (v.get(k) or 0.0) for v in retention.values() for k, _ in keys] + [100.0])
    axis.set_ylim(0, tallest * 1.12)
    axis.set_xticks(range(len(keys)), [label for _, label in keys])
    axis.set_ylabel("% of the teacher")
    axis.set_title("Retention vs the teacher")
    axis.legend(fontsize=8)
    data = _png_bytes(figure)
    plt.close(figure)
    return data


def difficulty_chart(report: dict) -> bytes | None:
    """Retention and KL per teacher-entropy bucket (`judging.difficulty_figure`) as PNG bytes."""
    plt = _pyplot()
    figure = difficulty_figure(report, plt)
    if figure is None:
        return None
    data = _png_bytes(figure)
    plt.close(figure)
    return data


def _tokens_at(train_events: list[dict], step: int):
    """Tokens seen at `step`: from the last train event at or before it (eval events carry no token count)."""
    seen = None
    for event in train_events:
        if event.get("step", 0) <= step and event.get("tokens") is not None:
            seen = event["tokens"]
    return seen


def _series(events: list[dict], key: str, train: list[dict], by_tokens: bool) -> list[tuple[float, float]]:
    points = []
    for e in events:
        y = e.get(key)
        if not isinstance(y, (int, float)) or not math.isfinite(y):
            continue
        if not by_tokens:
            x = e["step"]
        elif e.get("event") == "train":
            x = e.get("tokens")
        else:
            x = _tokens_at(train, e["step"])
        if x is not None:
            points.append((x, y))
    return points


def training_curves(events: list[dict]) -> bytes | None:
    """Loss, KL to the teacher and agreement against step (top row) and tokens seen (bottom row)."""
    plt = _pyplot()
    train = [e for e in events if e.get("event") == "train" and "step" in e]
    evals = [e for e in events if e.get("event") == "eval" and "step" in e]
    if plt is None or not (train or evals):
        return None
    panels = [
        (
            "loss",
            [
                ("train", train, "loss"),
                ("train KD", train, "kd_loss"),
                ("train CE", train, "ce_loss"),
                ("eval CE", evals, "eval_cross_entropy"),
            ],
        ),
        ("KL(teacher ‖ student)", [("eval", evals, "eval_kl_to_teacher")]),
        (
            "agreement with the teacher",
            [("eval", evals, "eval_agreement"), ("eval top-1 acc.", evals, "eval_top1_accuracy")],
        ),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    for column, (title, series) in enumerate(panels):
        for row, x_name in enumerate(("step", "tokens seen")):
            axis = axes[row][column]
            for label, source, key in series:
                points = _series(source, key, train, by_tokens=row == 1)
                # A train term that is identically zero (ce_loss with ce_weight 0) would only hide the others.
                if points and (key.startswith("eval") or any(y != 0 for _, y in points)):
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel(x_name)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    figure.tight_layout()
    data = _png_bytes(figure)
    plt.close(figure)
    return data


# ---------------------------------------------------------------- writers


def _json_safe(value):
    """NaN and infinity are not JSON; report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_line(report: dict) -> str:
    parts = []
    for name, r in report.get("retention", {}).items():
        s = report.get("speedup", {}).get(name, {})
        parts.append(
            f"{name} keeps {_percent(r.get('cross_entropy'))} of the teacher's cross-entropy and "
            f"{_percent(r.get('top1_accuracy'))} of its top-1 accuracy, agrees with it on "
            f"{_number('agreement', report['models'][name].get('agreement'))} of tokens, with "
            f"{_times(s.get('params'))} fewer parameters and {_times(s.get('decode'))} the decode speed."
        )
    return " ".join(parts)


def render_markdown(report: dict, pictures: list[tuple[str, str]]) -> str:
    data = report.get("data", {})
    lines = ["# Distillation report", ""]
    if data:
        lines += [
            f"Eval data: `{data.get('path')}` — {data.get('sequences')} sequences, "
            f"{data.get('counted_tokens')} counted tokens, {data.get('counted_bytes')} bytes "
            f"(max length {data.get('max_length')}).",
            "",
        ]
    summary = _summary_line(report)
    if summary:
        lines += [summary, ""]
    for title, header, rows in _tables(report) + _completion_tables(report) + _divergent_tables(report):
        lines += [f"## {title}", "", _markdown_table(header, rows), ""]
    for file, caption in pictures:
        lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    if report.get("definitions"):
        lines += ["## Definitions", ""]
        lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-weight: 600; }
td.text { text-align: left; font-family: ui-monospace, monospace; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; }
dt { font-weight: 600; margin-top: 0.4rem; } dd { margin-left: 1.5rem; }
"""


def _html_table(header: list[str], rows: list[list[str]], text_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="text">{html.escape(c)}</td>' if i in text_columns else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict, pictures: list[tuple[str, str, bytes]]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>Distillation report</title>"]
    parts += [f"<style>{_CSS}</style>", "</head><body>", "<h1>Distillation report</h1>"]
    data = report.get("data", {})
    if data:
        parts.append(
            f"<p>Eval data: <code>{html.escape(str(data.get('path')))}</code> — {data.get('sequences')} sequences, "
            f"{data.get('counted_tokens')} counted tokens, {data.get('counted_bytes')} bytes "
            f"(max length {data.get('max_length')}).</p>"
        )
    summary = _summary_line(report)
    if summary:
        parts.append(f"<p>{html.escape(summary)}</p>")
    for title, header, rows in _tables(report):
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    for file, caption, png in pictures:
        encoded = base64.b64encode(png).decode("ascii")
        parts += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}" data-file="{html.escape(file)}">',
        ]
    for title, header, rows in _completion_tables(report):
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows, text_columns=set(range(1, len(header))))]
    for title, header, rows in _divergent_tables(report):
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows, text_columns={1, 2, 3, 4})]
    for name, result in report["models"].items():
        samples = result.get("generation_samples")
        if samples and not _completion_tables(report):  # the side-by-side table replaces them
            rows = [[s["prompt"], s["answer"], s["output"], "yes" if s["match"] else "no"] for s in samples]
            parts += [
                f"<h2>Generation samples: {html.escape(name)}</h2>",
                _html_table(["prompt", "answer", "output", "match"], rows, text_columns={0, 1, 2}),
            ]
    if report.get("definitions"):
        parts.append("<h2>Definitions</h2><dl>")
        parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in report["definitions"].items()]
        parts.append("</dl>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: dict, out_dir: str | Path, metrics_path: str | Path | None = None) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the PNGs into `out_dir`; returns {kind: path}.

    Training curves come from `metrics_path`, or from `out_dir/metrics.jsonl` when that exists (a run folder).
    Pictures need matplotlib; without it the report is written with tables only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if metrics_path is None and (out / "metrics.jsonl").exists():
        metrics_path = out / "metrics.jsonl"
    pictures: list[tuple[str, str, bytes]] = []
    retention_png = retention_chart(report)
    if retention_png is not None:
        pictures.append((RETENTION_PNG, "Retention vs the teacher", retention_png))
    difficulty_png = difficulty_chart(report)
    if difficulty_png is not None:
        pictures.append((DIFFICULTY_PNG, "Retention by difficulty (teacher entropy quartiles)", difficulty_png))
    if metrics_path is not None:
        curves_png = training_curves(read_metrics(Path(metrics_path)))
        if curves_png is not None:
            pictures.append((CURVES_PNG, "Training curves", curves_png))
    written = {}
    for file, _, png in pictures:
        atomic.write_bytes(out / file, png)
        written[file] = out / file
    atomic.write_text(out / "report.json", json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic.write_text(out / "report.md", render_markdown(report, [(f, c) for f, c, _ in pictures]))
    atomic.write_text(out / "report.html", render_html(report, pictures))
    written.update(json=out / "report.json", markdown=out / "report.md", html=out / "report.html")
    return written
