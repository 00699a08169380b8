"""The recipe schema: defaults, descriptions, validation messages, overrides, paths, `distill config show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from distill.cli import main
from distill.config import (
    ObjectiveConfig,
    Recipe,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
    apply_overrides,
    load_recipe,
    parse_override,
    recipe_from_dict,
)
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FOLDERS = [REPO / "examples", REPO / "src" / "distill" / "examples"]


def _sections(model: type[BaseModel] = Recipe, seen: set | None = None):
    """Every pydantic model reachable from the Recipe, the Recipe included."""
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _sections(candidate, seen)
    return seen


def _error(data: dict, overrides: dict | None = None) -> str:
    with pytest.raises(DistillError) as info:
        recipe_from_dict(data, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- schema


def test_schema_reaches_every_section():
    names = {model.__name__ for model in _sections()}
    assert {"TeacherConfig", "StudentConfig", "FromTeacherConfig", "DataConfig", "ObjectiveConfig"} <= names
    assert {"OnPolicyConfig", "TrainingConfig", "CacheConfig", "OutputConfig", "Recipe"} <= names


@pytest.mark.parametrize("model", sorted(_sections(), key=lambda m: m.__name__), ids=lambda m: m.__name__)
def test_every_field_has_default_and_description(model):
    assert model.model_fields, f"{model.__name__} has no fields"
    for name, field in model.model_fields.items():
        assert not field.is_required(), f"{model.__name__}.{name} has no default"
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no description"


def test_defaults_follow_the_design():
    recipe = Recipe()
    assert recipe.objective.divergence == "forward_kl"
    assert (recipe.objective.beta, recipe.objective.skew, recipe.objective.temperature) == (0.5, 0.1, 1.0)
    assert recipe.objective.ce_weight == 0.0 and recipe.objective.fused is True
    assert recipe.objective.on_policy.lambda_ == 0.0
    assert (recipe.training.batch_size, recipe.training.grad_accum, recipe.training.lr) == (8, 1, 1.0e-3)
    assert recipe.data.max_length == 256 and recipe.cache.top_k == 32
    assert recipe.teacher.trust_remote_code is False and recipe.student.trust_remote_code is False
    assert recipe_from_dict({}) == recipe


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"trainer": {}}, "trainer"),
        ({"training": {"learning_rate": 1e-3}}, "training.learning_rate"),
        ({"objective": {"on_policy": {"lambd": 0.5}}}, "objective.on_policy.lambd"),
        ({"student": {"from_teacher": {"layers": 2, "depth": 3}}}, "student.from_teacher.depth"),
    ],
)
def test_unknown_key_names_the_dotted_key(data, key):
    assert _error(data) == f"recipe key {key}: unknown key"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"training": {"steps": "many"}}, "training.steps"),
        ({"training": {"lr": [1]}}, "training.lr"),
        ({"data": {"max_length": 3.5}}, "data.max_length"),
        ({"objective": {"fused": "sometimes"}}, "objective.fused"),
        ({"teacher": {"dtype": "float64"}}, "teacher.dtype"),
        ({"student": {"config": 3}}, "student.config"),
        ({"training": "fast"}, "training"),
    ],
)
def test_wrong_type_names_the_key(data, key):
    assert _error(data).startswith(f"recipe key {key}: ")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"objective": {"beta": 1.5}}, "objective.beta"),
        ({"objective": {"beta": -0.1}}, "objective.beta"),
        ({"objective": {"skew": 1.0}}, "objective.skew"),
        ({"objective": {"temperature": 0}}, "objective.temperature"),
        ({"objective": {"temperature": float("inf")}}, "objective.temperature"),
        ({"objective": {"on_policy": {"lambda": 1.5}}}, "objective.on_policy.lambda"),
        ({"objective": {"divergence": "kl"}}, "objective.divergence"),
        ({"training": {"lr": -1e-3}}, "training.lr"),
        ({"training": {"lr": float("inf")}}, "training.lr"),
        ({"training": {"lr": float("nan")}}, "training.lr"),
        ({"training": {"steps": 0}}, "training.steps"),
        ({"data": {"max_length": 1}}, "data.max_length"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
        ({"cache": {"top_k": 0}}, "cache.top_k"),
    ],
)
def test_impossible_values_name_the_key(data, key):
    assert _error(data).startswith(f"recipe key {key}: ")


def test_batch_size_must_divide_by_grad_accum():
    message = _error({"training": {"batch_size": 8, "grad_accum": 3}})
    assert message.startswith("recipe key training: ") and "divisible" in message
    assert recipe_from_dict({"training": {"batch_size": 8, "grad_accum": 4}}).training.grad_accum == 4


def test_some_training_signal_is_required():
    message = _error({"objective": {"kd_weight": 0, "ce_weight": 0}})
    assert message.startswith("recipe key objective: ") and "kd_weight" in message and "ce_weight" in message
    hard_labels = recipe_from_dict({"objective": {"kd_weight": 0, "ce_weight": 1}})
    assert not hard_labels.needs_teacher


def test_student_takes_one_source():
    message = _error({"student": {"path": "./s", "config": {"model_type": "llama"}}})
    assert message.startswith("recipe key student: ") and "path" in message and "config" in message
    assert _error({"student": {"path": "./s", "from_teacher": {"layers": 2}}}).startswith("recipe key student: ")
    assert _error({"student": {"from_teacher": {}}}).startswith("recipe key student.from_teacher: ")


def test_many_problems_are_still_one_line():
    message = _error({"training": {"steps": 0, "lr": -1}, "objective": {"beta": 2}})
    assert "2 more problems" in message


def test_validate_assignment_keeps_the_checks():
    recipe = Recipe()
    with pytest.raises(ValueError):
        recipe.objective.beta = 2.0


# ---------------------------------------------------------------- overrides


def test_override_values_are_read_as_yaml():
    assert parse_override("training.lr=3e-4") == ("training.lr", pytest.approx(3e-4))
    assert isinstance(parse_override("training.lr=3e-4")[1], float)
    assert isinstance(parse_override("training.lr=1.0e-3")[1], float)
    assert parse_override("training.steps=10") == ("training.steps", 10)
    assert parse_override("objective.fused=false") == ("objective.fused", False)
    assert parse_override("teacher.path=null") == ("teacher.path", None)
    assert parse_override("teacher.path=") == ("teacher.path", None)
    assert parse_override("training.betas=[0.8, 0.9]") == ("training.betas", [0.8, 0.9])
    assert parse_override("output.dir=runs/a=b") == ("output.dir", "runs/a=b")
    assert parse_override("data.train=[oops") == ("data.train", "[oops")


def test_override_reaches_the_recipe_as_float():
    recipe = recipe_from_dict({}, dict([parse_override("training.lr=3e-4")]))
    assert recipe.training.lr == pytest.approx(3e-4) and isinstance(recipe.training.lr, float)


def test_exponent_floats_in_a_recipe_stay_floats(tmp_path):
    # YAML 1.1 reads `1e-6` as a string; inside `student.config` nothing would convert it back.
    path = _write(
        tmp_path, "training:\n  lr: 3e-4\nstudent:\n  config:\n    model_type: llama\n    rms_norm_eps: 1e-6\n"
    )
    recipe = load_recipe(path)
    assert recipe.training.lr == pytest.approx(3e-4)
    assert recipe.student.config["rms_norm_eps"] == pytest.approx(1e-6)
    assert isinstance(recipe.student.config["rms_norm_eps"], float)


def test_on_policy_lambda_override_by_alias_and_name():
    by_alias = recipe_from_dict({}, dict([parse_override("objective.on_policy.lambda=0.5")]))
    assert by_alias.objective.on_policy.lambda_ == 0.5
    by_name = recipe_from_dict({}, {"objective.on_policy.lambda_": 0.25})
    assert by_name.objective.on_policy.lambda_ == 0.25
    assert "lambda: 0.5" in by_alias.to_yaml()


@pytest.mark.parametrize("text", ["training.lr", "=3", "training..lr=3", ".lr=3", "training.=3", ""])
def test_bad_override_syntax(text):
    with pytest.raises(DistillError, match="expected dotted.key=value"):
        parse_override(text)


def test_override_into_a_value_is_refused():
    with pytest.raises(DistillError, match="override training.lr.peak: lr is not a section"):
        recipe_from_dict({"training": {"lr": 1e-3}}, {"training.lr.peak": 1})


def test_override_of_an_unknown_key_names_it():
    assert _error({}, {"training.lrr": 1}) == "recipe key training.lrr: unknown key"


def test_overrides_do_not_touch_the_input_and_create_sections():
    data = {"training": {"steps": 5}, "student": None}
    result = apply_overrides(data, {"training.steps": 7, "student.path": "./s", "objective.on_policy.lambda": 0.1})
    assert data == {"training": {"steps": 5}, "student": None}
    assert result["training"]["steps"] == 7 and result["student"] == {"path": "./s"}
    assert result["objective"]["on_policy"]["lambda"] == 0.1


def test_load_recipe_accepts_override_strings_and_dicts(tmp_path):
    path = _write(tmp_path, "training:\n  steps: 5\n")
    assert load_recipe(path, ["training.steps=9", "training.lr=3e-4"]).training.steps == 9
    assert load_recipe(path, {"training.steps": 11}).training.steps == 11
    assert load_recipe(path).training.steps == 5


# ---------------------------------------------------------------- files and paths


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes" / "nested"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # somewhere else than the recipe
    path = _write(
        folder,
        "teacher: {path: ./teacher}\n"
        "student: {from_teacher: {layers: 2, calibration: ../calib.jsonl}}\n"
        "data: {train: ./train.jsonl, eval: ../eval.jsonl}\n"
        "cache: {dir: ./cache}\n"
        "output: {dir: ../runs/a}\n",
    )
    recipe = load_recipe(path)
    assert Path(recipe.teacher.path) == folder.resolve() / "teacher"
    assert Path(recipe.student.from_teacher.calibration) == folder.parent.resolve() / "calib.jsonl"
    assert Path(recipe.data.train) == folder.resolve() / "train.jsonl"
    assert Path(recipe.data.eval) == folder.parent.resolve() / "eval.jsonl"
    assert Path(recipe.cache.dir) == folder.resolve() / "cache"
    assert Path(recipe.output.dir) == folder.parent.resolve() / "runs" / "a"


def test_relative_paths_of_several_teachers_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    path = _write(
        folder,
        "teachers: {code: {path: ./code-teacher}, prose: {cache: ../prose-cache}}\n"
        "student: {path: ./s}\ndata: {train: ./train.jsonl}\n",
    )
    recipe = load_recipe(path)
    assert Path(recipe.teachers["code"].path) == folder.resolve() / "code-teacher"
    assert Path(recipe.teachers["prose"].cache) == tmp_path.resolve() / "prose-cache"
    assert recipe.teachers["code"].cache is None and recipe.data.eval is None


def test_hub_ids_and_absolute_paths_are_left_alone(tmp_path):
    path = _write(tmp_path, "teacher: {path: Qwen/Qwen3-0.6B}\ndata: {train: /abs/train.jsonl}\nstudent: {path: ./s}\n")
    recipe = load_recipe(path, ["student.path=./elsewhere"])
    assert recipe.teacher.path == "Qwen/Qwen3-0.6B"
    assert recipe.data.train == "/abs/train.jsonl"
    # Command-line overrides are relative to the current folder, not the recipe's.
    assert recipe.student.path == "./elsewhere"


def test_invalid_yaml_is_one_line_with_the_line_number(tmp_path):
    path = _write(tmp_path, "training:\n  steps: 5\n  lr: [1e-3\nobjective:\n  beta: 0.5\n")
    with pytest.raises(DistillError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not valid YAML" in message
    assert "line 4" in message


def test_tab_indented_yaml_names_its_line(tmp_path):
    path = _write(tmp_path, "training:\n  steps: 5\n\tlr: 1\n")
    with pytest.raises(DistillError, match=r"not valid YAML at line 3"):
        load_recipe(path)


def test_missing_empty_and_non_mapping_recipes(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(DistillError, match="does not exist"):
        load_recipe(tmp_path)  # a folder is not a recipe
    assert load_recipe(_write(tmp_path, "", "empty.yaml")) == Recipe()
    with pytest.raises(DistillError, match="mapping of sections"):
        load_recipe(_write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_check_runnable_names_what_is_missing():
    with pytest.raises(DistillError, match="recipe key data.train"):
        Recipe().check_runnable()
    with pytest.raises(DistillError, match="recipe key teacher.path"):
        recipe_from_dict({"data": {"train": "t"}, "student": {"path": "s"}}).check_runnable()
    with pytest.raises(DistillError, match="recipe key student:"):
        recipe_from_dict({"data": {"train": "t"}, "teacher": {"path": "t"}}).check_runnable()
    recipe_from_dict({"data": {"train": "t"}, "teacher": {"path": "t"}, "student": {"path": "s"}}).check_runnable()


# ---------------------------------------------------------------- `distill config show`


def test_config_show_round_trips(tmp_path, capsys):
    path = _write(
        tmp_path,
        "teacher: {path: ./teacher}\nstudent: {config: {model_type: qwen2, hidden_size: 32}}\n"
        "objective: {divergence: jsd, beta: 0.3, on_policy: {lambda: 0.5}}\ntraining: {lr: 3e-4, betas: [0.8, 0.9]}\n",
    )
    code = main(["config", "show", str(path), "training.steps=7", "objective.temperature=2"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    shown = recipe_from_dict(yaml.safe_load(out))
    assert shown == load_recipe(path, ["training.steps=7", "objective.temperature=2"])
    assert shown.training.steps == 7 and shown.objective.on_policy.lambda_ == 0.5
    assert shown.training.lr == pytest.approx(3e-4)
    assert Path(shown.teacher.path) == tmp_path.resolve() / "teacher"
    # Every default is filled in.
    assert set(yaml.safe_load(out)["training"]) == set(TrainingConfig.model_fields)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("objective:\n  beta: 1.5\n", [], "recipe key objective.beta"),
        ("training:\n  lr: [1\n", [], "not valid YAML at line"),
        ("training:\n  steps: 5\n", ["training.lrr=1"], "recipe key training.lrr: unknown key"),
        ("training:\n  steps: 5\n", ["oops"], "expected dotted.key=value"),
        ("student:\n  path: ./a\n  config: {model_type: llama}\n", [], "recipe key student"),
    ],
)
def test_config_show_bad_recipe_exits_2_with_one_line(tmp_path, capsys, text, overrides, expected):
    path = _write(tmp_path, text)
    code = main(["config", "show", str(path), *overrides])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("distill: error: ") and expected in err
    assert "Traceback" not in err


def test_config_show_missing_recipe_and_usage_errors_exit_2(tmp_path, capsys):
    assert main(["config", "show", str(tmp_path / "missing.yaml")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert main(["config", "show"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


# ---------------------------------------------------------------- shipped recipes


def _shipped(path: Path) -> bool:
    # runs/ (git-ignored) holds the outputs of trying an example, e.g. the copy of the recipe a run saves.
    return "runs" not in path.parts and "checkpoints" not in path.parts


def _example_recipes() -> list[Path]:
    found = (p for folder in EXAMPLE_FOLDERS if folder.is_dir() for p in folder.rglob("*.y*ml"))
    return sorted(p for p in found if _shipped(p.relative_to(REPO)))


@pytest.mark.parametrize("path", _example_recipes(), ids=lambda p: str(p.relative_to(REPO)))
def test_example_recipe_parses(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_example_folder_with_recipes_is_collected():
    # Guards the glob above: if a folder holds YAML files, the parametrized test must see every one of them.
    for folder in EXAMPLE_FOLDERS:
        on_disk = [p for p in folder.rglob("*") if p.suffix.lower() in (".yaml", ".yml")] if folder.is_dir() else []
        on_disk = [p for p in on_disk if _shipped(p.relative_to(REPO))]
        if on_disk:
            assert len(_example_recipes()) >= 1
            assert set(on_disk) <= set(_example_recipes())


def test_recipe_types_are_pydantic_sections():
    # Guards `_sections`: if sections stopped being pydantic models, the description test would check nothing.
    for model in (TeacherConfig, StudentConfig, ObjectiveConfig, TrainingConfig):
        assert model in _sections()
