"""training.report_to: the trackers hold the metrics.jsonl scalars at the same steps; resume; a missing extra."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from distill.cli import main
from helpers import recipe_dict, write_recipe

SCALARS = ("loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s")


def _train(tmp_path, content, *args) -> int:
    return main(["train", str(write_recipe(tmp_path / "recipe.yaml", content)), "--quiet", *args])


def _events(out, kind="train") -> list[dict]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == kind]


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _recipe(teacher_dir, student_dir, train_file, out, report_to, **training):
    return recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        out,
        objective={"ce_weight": 0.5},  # both loss terms non-zero
        training={"save_every": 2, "eval_every": 2, "report_to": report_to, **training},
    )


def test_tensorboard_holds_the_metrics_jsonl_scalars_and_a_resume_appends_without_repeats(
    tmp_path, teacher_dir, student_dir, train_file
):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (in `test`) is not installed")
    out = tmp_path / "run"
    content = _recipe(teacher_dir, student_dir, train_file, out, ["tensorboard"])
    assert _train(tmp_path, content) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "event files straight in output.dir/tensorboard"
    scalars = _tensorboard_scalars(out / "tensorboard")
    train_events = _events(out)
    for key in SCALARS:
        assert [step for step, _ in scalars[key]] == [e["step"] for e in train_events] == [1, 2, 3, 4], key
        assert [v for _, v in scalars[key]] == pytest.approx([e[key] for e in train_events], rel=1e-6), key
    eval_events = _events(out, "eval")
    assert [step for step, _ in scalars["eval_kl_to_teacher"]] == [e["step"] for e in eval_events] == [2, 4]
    assert [v for _, v in scalars["eval_kl_to_teacher"]] == pytest.approx(
        [e["eval_kl_to_teacher"] for e in eval_events]
    )

    # Killed after step 2: the resumed run redoes steps 3 and 4; TensorBoard shows each step once, as metrics.jsonl.
    shutil.rmtree(out / "checkpoints" / "step-4")
    assert _train(tmp_path, content, "--resume") == 0
    resumed = _tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in resumed["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in resumed["loss"]] == pytest.approx([e["loss"] for e in _events(out)], rel=1e-6)


def test_wandb_offline_run_holds_the_loss(tmp_path, teacher_dir, student_dir, train_file, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra (in `test`) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    out = tmp_path / "run"
    assert _train(tmp_path, _recipe(teacher_dir, student_dir, train_file, out, ["wandb"])) == 0
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = _wandb_history(run_file)
    train_events = _events(out)
    for key in SCALARS:
        logged = [(row["_step"], row[key]) for row in history if key in row]
        assert logged == pytest.approx([(e["step"], e[key]) for e in train_events]), key
    eval_logged = [(row["_step"], row["eval_kl_to_teacher"]) for row in history if "eval_kl_to_teacher" in row]
    assert eval_logged == pytest.approx([(e["step"], e["eval_kl_to_teacher"]) for e in _events(out, "eval")])


def _wandb_history(path) -> list[dict]:
    """The history rows (one per step) of an offline run's .wandb file: W&B's protobuf records in LevelDB-log
    framing (a 7-byte file header, then 32 KiB blocks of records: crc32 (4), length (2, little-endian), type (1: whole,
    2-4: parts)). wandb 0.31 has no public reader of offline runs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = path.read_bytes(), 7, 1 << 15, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}
                rows.append({**row, "_step": record.history.step.num})
            pending = b""
    return rows


def test_mlflow_file_store_holds_the_loss(tmp_path, teacher_dir, student_dir, train_file, monkeypatch):
    pytest.importorskip("mlflow", reason="the [mlflow] extra (mlflow-skinny in `test`) is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    out = tmp_path / "run"
    assert _train(tmp_path, _recipe(teacher_dir, student_dir, train_file, out, ["mlflow"])) == 0
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()
    train_events = _events(out)
    for key in SCALARS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [e["step"] for e in train_events], key
        assert [v for _, v in history] == pytest.approx([e[key] for e in train_events]), key
    run = client.get_run(run_id)
    assert run.data.params["objective.ce_weight"] == "0.5" and run.info.status == "FINISHED"


def test_trackio_holds_the_loss(tmp_path, teacher_dir, student_dir, train_file, monkeypatch):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("the [trackio] extra is not installed (it is not in `test`: it pins pillow below 13)")
    # trackio reads TRACKIO_DIR when imported: set it first (nothing imports trackio before this test's run).
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out = tmp_path / "run"
    assert _train(tmp_path, _recipe(teacher_dir, student_dir, train_file, out, ["trackio"])) == 0
    from trackio import SQLiteStorage

    name = json.loads((out / "trackers.json").read_text())["trackio"]["name"]
    logs = SQLiteStorage.get_logs("distill", run=name)
    for key in SCALARS:
        logged = [(row["step"], row[key]) for row in logs if key in row]
        assert logged == pytest.approx([(e["step"], e[key]) for e in _events(out)]), key


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_missing_tracker_is_one_line_naming_its_extra(
    tmp_path, teacher_dir, student_dir, train_file, capsys, monkeypatch, name
):
    import distill.train.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda module: False)
    out = tmp_path / "run"
    assert _train(tmp_path, _recipe(teacher_dir, student_dir, train_file, out, [name])) == 2
    err = capsys.readouterr().err.strip()
    assert "training.report_to" in err and f"distill[{name}]" in err and "\n" not in err
    assert not (out / "checkpoints").exists()  # refused before training started


def test_an_unknown_tracker_names_the_key(tmp_path, teacher_dir, student_dir, train_file, capsys):
    content = _recipe(teacher_dir, student_dir, train_file, tmp_path / "run", ["neptune"])
    assert _train(tmp_path, content) == 2
    assert "training.report_to" in capsys.readouterr().err
