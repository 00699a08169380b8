"""The report files: report.json keys as the contract says, Markdown and one self-contained HTML whose pictures
load in a real browser (headless Chromium), training curves from metrics.jsonl, atomic writes."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPORT_MODEL_KEYS, write_jsonl
from distill.report.draft import DraftSettings
from distill.report.evaluate import evaluate_models
from distill.report.failures import FailureSettings
from distill.report.render import write_report
from distill.report.speed import SpeedSettings

CONTRACT_MODEL_KEYS = REPORT_MODEL_KEYS
CONTRACT_RETENTION_KEYS = {"top1_accuracy", "cross_entropy", "agreement"}
CONTRACT_SPEEDUP_KEYS = {"decode", "params"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics_events() -> list[dict]:
    events = [
        {"event": "train", "step": s, "loss": 3.0 - 0.1 * s, "kd_loss": 2.0 - 0.1 * s, "ce_loss": 0.0, "tokens": 64 * s}
        for s in range(1, 9)
    ]
    for s in (4, 8):
        events.append(
            {
                "event": "eval",
                "step": s,
                "eval_cross_entropy": 5.0 - 0.1 * s,
                "eval_kl_to_teacher": 1.0 / s,
                "eval_agreement": 0.05 * s,
                "eval_top1_accuracy": 0.02 * s,
                "eval_tokens": 40,
            }
        )
    return events


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, teacher_dir, student_dir):
    """One full evaluation (quality, timing, generation, curves) shared by the tests of this file."""
    folder = tmp_path_factory.mktemp("report")
    data = write_jsonl(
        folder / "eval.jsonl",
        [{"prompt": "def add(a, b):", "completion": "\n    return a + b\n"}, {"text": "hello world, the lazy fox"}] * 2,
    )
    generation = write_jsonl(folder / "gen.jsonl", [{"prompt": "hello", "answer": "world"}])
    metrics = write_jsonl(folder / "metrics.jsonl", _metrics_events())
    out = folder / "out"
    report = evaluate_models(
        str(teacher_dir),
        {"student": str(student_dir), "baseline": str(student_dir)},
        str(data),
        str(out),
        generation=str(generation),
        generation_extra_tokens=2,
        metrics_path=str(metrics),
        speed_settings=SpeedSettings(runs=1, warmup=0, prompt_tokens=8, new_tokens=2, batch_size=2),
        draft_settings=DraftSettings(prompts=2, new_tokens=6, draft_tokens=3),
        failure_settings=FailureSettings(prompts=2, new_tokens=8),
        show_progress=False,
        log=lambda *_: None,
    )
    return report, out


def test_report_json_follows_the_contract(evaluated):
    report, out = evaluated
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"].keys() == {"teacher", "student", "baseline"}
    for name, result in on_disk["models"].items():
        assert result.keys() >= CONTRACT_MODEL_KEYS, name
        for key in CONTRACT_MODEL_KEYS:
            assert isinstance(result[key], (int, float)) and not isinstance(result[key], bool), (name, key)
        assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
        assert result["perplexity"] > 1.0 and result["bits_per_byte"] > 0
    assert isinstance(on_disk["models"]["teacher"]["params"], int)
    assert on_disk["models"]["teacher"]["agreement"] == 1.0 and on_disk["models"]["teacher"]["kl_to_teacher"] == 0.0
    assert on_disk["retention"].keys() == on_disk["speedup"].keys() == {"student", "baseline"}
    teacher = on_disk["models"]["teacher"]
    for name in ("student", "baseline"):
        model = on_disk["models"][name]
        assert on_disk["retention"][name].keys() >= CONTRACT_RETENTION_KEYS
        assert on_disk["speedup"][name].keys() >= CONTRACT_SPEEDUP_KEYS
        assert on_disk["speedup"][name]["params"] == pytest.approx(teacher["params"] / model["params"])
        assert on_disk["speedup"][name]["decode"] == pytest.approx(
            model["decode_tokens_per_s"] / teacher["decode_tokens_per_s"]
        )
        assert on_disk["retention"][name]["cross_entropy"] == pytest.approx(
            teacher["cross_entropy"] / model["cross_entropy"]
        )
        assert on_disk["retention"][name]["agreement"] == pytest.approx(model["agreement"] / teacher["agreement"])
        assert "exact_match" in model and model["size_on_disk_bytes"] > 0 and model["peak_memory_bytes"] > 0
    assert on_disk["models"]["student"]["cross_entropy"] == pytest.approx(report["models"]["student"]["cross_entropy"])
    assert "retention" in on_disk["definitions"]


def test_report_files_are_written_whole(evaluated):
    _, out = evaluated
    names = {p.name for p in out.iterdir()}
    assert {
        "report.json",
        "report.md",
        "report.html",
        "retention.png",
        "training_curves.png",
        "by_difficulty.png",
    } <= names
    assert not [n for n in names if ".tmp" in n]  # no left-over temporary files
    for png in ("retention.png", "training_curves.png", "by_difficulty.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    markdown = (out / "report.md").read_text()
    assert "| model |" in markdown and "![Retention vs the teacher](retention.png)" in markdown
    for section in ("As the teacher's draft", "Retention by difficulty", "Failure modes"):
        assert f"## {section}" in markdown, section
    assert "## Definitions" in markdown


def test_html_is_one_static_file(evaluated):
    _, out = evaluated
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3  # retention, by difficulty, training curves
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<table>") >= 5


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Appended to a copy of the page: after load, it writes what the browser saw into the DOM that --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    images: Array.prototype.map.call(document.images, function (i) { return [i.complete, i.naturalWidth]; }),
    tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('td').length
  });
  document.body.appendChild(out);
});
</script>"""


def test_html_renders_in_headless_chromium(evaluated, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must install it (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI runs this test")
    _, out = evaluated
    page = tmp_path / "page.html"
    page.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe output (exit {done.returncode}): {done.stderr[-2000:]}"
    seen = json.loads(found.group(1))
    assert len(seen["images"]) == 3
    assert all(complete and width > 0 for complete, width in seen["images"]), seen
    assert seen["tables"] >= 5 and seen["rows"] > 20


def test_write_report_alone_without_metrics(tmp_path):
    teacher = {"params": 100, "cross_entropy": 2.0, "perplexity": 7.39, "bits_per_byte": 1.0, "top1_accuracy": 0.5}
    teacher.update(agreement=1.0, kl_to_teacher=0.0, prefill_tokens_per_s=10.0, decode_tokens_per_s=5.0)
    student = {**teacher, "params": 25, "cross_entropy": 2.5, "agreement": 0.8, "kl_to_teacher": 0.3}
    report = {
        "models": {"teacher": teacher, "student": student},
        "retention": {"student": {"top1_accuracy": 1.0, "cross_entropy": 0.8, "agreement": 0.8}},
        "speedup": {"student": {"decode": 1.0, "params": 4.0}},
        "extra": float("nan"),
    }
    written = write_report(report, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"report.json", "report.md", "report.html", "retention.png"}  # no metrics: no curves
    assert json.loads(written["json"].read_text())["extra"] is None  # NaN is not JSON
    assert "80.0%" in written["markdown"].read_text()


def test_run_folder_metrics_are_found_automatically(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", _metrics_events())
    report = {"models": {"teacher": {"params": 1}}, "retention": {}, "speedup": {}}
    write_report(report, tmp_path)
    assert (tmp_path / "training_curves.png").read_bytes().startswith(PNG_MAGIC)
