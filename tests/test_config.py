"""Recipes: defaults, YAML, key=value overrides, and errors that name the key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from dalign.config import (
    BaseConfig, ConfigError, DialoguesConfig, EvalConfig, MemberConfig, ModelShape, RoleSpec, SFTConfig,
    TeacherConfig, TeacherRole, TrainConfig,
)
from dalign.recipe import DryRunConfig, RecipeConfig, StartModel, load_recipe

OFFLINE = Path(__file__).resolve().parent.parent / "recipes" / "offline.yaml"


def write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading ---------------------------------------------------------------------------------


def test_defaults():
    recipe = load_recipe(None)
    assert recipe == RecipeConfig()
    assert recipe.name == "offline" and recipe.run_dir == "runs/offline"
    assert recipe.sft.learning_rate == 2e-3 and recipe.base.learning_rate == 3e-3  # BaseConfig overrides the LR
    assert recipe.dialogues.min_turns <= recipe.dialogues.max_turns
    assert recipe.base.model.hidden_size % recipe.base.model.heads == 0
    assert isinstance(recipe.roles.teacher.world, TeacherConfig) and isinstance(recipe.sft, SFTConfig)


def test_offline_recipe_loads_and_states_the_defaults():
    recipe = load_recipe(OFFLINE)
    assert isinstance(recipe, RecipeConfig)
    assert recipe.name == "offline"
    # The file says "every value here is also the built-in default but evaluate.mc".
    assert recipe == load_recipe(None, ["evaluate.mc={tasks: [world_facts]}"])
    assert load_recipe(str(OFFLINE)) == recipe


def test_yaml_values_take_effect(tmp_path):
    path = write(tmp_path, "name: small\nsft:\n  learning_rate: 2.0e-4\n  packing: true\nbase:\n  model:\n    layers: 2\n")
    recipe = load_recipe(path)
    assert recipe.name == "small" and recipe.sft.learning_rate == 2e-4 and recipe.sft.packing is True
    assert recipe.base.model.layers == 2 and recipe.base.model.hidden_size == ModelShape().hidden_size
    assert recipe.roles.teacher.world == TeacherConfig()  # untouched sections keep their defaults
    assert load_recipe(write(tmp_path, "", "empty.yaml")) == RecipeConfig()


def test_overrides_take_effect_with_the_right_type():
    recipe = load_recipe(None, ["sft.learning_rate=5e-4", "sft.packing=true", "base.model.layers=2",
                                "dialogues.n_dialogues=10", "sft.max_steps=7", "run_dir=runs/x"])
    assert recipe.sft.learning_rate == 0.0005 and type(recipe.sft.learning_rate) is float
    assert recipe.sft.packing is True
    assert recipe.base.model.layers == 2 and type(recipe.base.model.layers) is int
    assert recipe.dialogues.n_dialogues == 10 and recipe.sft.max_steps == 7 and recipe.run_dir == "runs/x"
    assert load_recipe(None, ["sft.packing=false"]).sft.packing is False
    assert load_recipe(None, ["sft.max_steps=null"]).sft.max_steps is None


def test_overrides_win_over_the_yaml_file(tmp_path):
    path = write(tmp_path, "sft:\n  learning_rate: 2.0e-4\n  epochs: 3\n")
    recipe = load_recipe(path, ["sft.learning_rate=1e-5"])
    assert recipe.sft.learning_rate == 1e-5 and recipe.sft.epochs == 3.0


def test_loading_does_not_share_state_between_recipes():
    first = load_recipe(None, ["sft.learning_rate=5e-4"])
    assert load_recipe(None).sft.learning_rate == 2e-3 and first.sft.learning_rate == 5e-4
    first.sft.learning_rate = 0.25
    assert RecipeConfig().sft.learning_rate == 2e-3
    with pytest.raises(ValidationError):  # assignments are validated too
        first.sft.learning_rate = -1.0


# --- errors ------------------------------------------------------------------------------------


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_unknown_yaml_key_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "sft:\n  learnin_rate: 1.0e-3\n")
    message = error_of(path)
    assert str(path) in message and "sft.learnin_rate" in message
    message = error_of(write(tmp_path, "sft:\n  learning_rate: 1.0e-3\nevaluation:\n  seed: 1\n", "b.yaml"))
    assert "b.yaml" in message and "evaluation" in message


def test_unknown_override_key_is_named():
    assert "sft.learnin_rate" in error_of(None, ["sft.learnin_rate=1e-3"])
    assert "base.model.depth" in error_of(None, ["base.model.depth=3"])
    assert "nosuch" in error_of(OFFLINE, ["nosuch=1"])


@pytest.mark.parametrize("overrides, key", [
    (["sft.per_device_batch_size=abc"], "sft.per_device_batch_size"),
    (["sft.learning_rate=fast"], "sft.learning_rate"),
    (["sft.packing=maybe"], "sft.packing"),
    (["roles.teacher.world.ramble=1.5"], "roles.teacher.world.ramble"),
    (["roles.teacher.world.error=-0.1"], "roles.teacher.world.error"),
    (["sft.learning_rate=0"], "sft.learning_rate"),
    (["sft.warmup_ratio=1"], "sft.warmup_ratio"),
    (["base.model.vocab_size=10"], "base.model.vocab_size"),
    (["evaluate.pass_k=0"], "evaluate.pass_k"),
])
def test_wrong_type_or_impossible_value_is_named(overrides, key):
    message = error_of(None, overrides)
    assert key in message, message


def test_cross_field_checks_name_their_fields(tmp_path):
    message = error_of(None, ["dialogues.min_turns=5", "dialogues.max_turns=3"])
    assert "dialogues" in message and "min_turns" in message and "max_turns" in message, message
    assert "min_turns" in error_of(None, ["dialogues.min_turns=5"])  # above the default max_turns 3
    message = error_of(None, ["base.model.hidden_size=100", "base.model.heads=3"])
    assert "base.model" in message and "hidden_size" in message and "heads" in message, message
    path = write(tmp_path, "dialogues:\n  min_turns: 4\n  max_turns: 2\n")
    message = error_of(path)
    assert str(path) in message and "min_turns" in message


def test_wrong_value_in_yaml_names_file_and_key(tmp_path):
    path = write(tmp_path, "roles:\n  teacher:\n    world: {ramble: 1.5}\n")
    message = error_of(path)
    assert str(path) in message and "roles.teacher.world.ramble" in message


def test_malformed_recipes_and_overrides(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(missing)
    assert "bad.yaml" in error_of(write(tmp_path, "sft: [1, 2\n", "bad.yaml"))  # YAML syntax error
    assert "list.yaml" in error_of(write(tmp_path, "- 1\n- 2\n", "list.yaml"))  # not a mapping
    assert "sft.learning_rate" in error_of(None, ["sft.learning_rate"])  # no '='
    assert "name" in error_of(OFFLINE, ["name.x=1"])  # 'name' is a value, not a section


# --- every field documented where declared -------------------------------------------------------


def walk(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield prefix + name, info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from walk(info.annotation, f"{prefix}{name}.")


def test_every_field_has_a_description():
    fields = dict(walk(RecipeConfig))
    assert {"sft.learning_rate", "base.model.heads", "dialogues.max_turns", "evaluate.seed", "roles.teacher"} <= set(fields)
    undocumented = [key for key, info in fields.items() if not (info.description or "").strip()]
    assert undocumented == []
    for cls in (TeacherConfig, ModelShape, TrainConfig, BaseConfig, DialoguesConfig, SFTConfig, EvalConfig, RoleSpec,
                TeacherRole, MemberConfig, StartModel, DryRunConfig):
        assert all((info.description or "").strip() for info in cls.model_fields.values()), cls.__name__


def test_a_variant_names_its_loss_and_only_where_it_means_something():
    from dalign.run import plan

    recipe = load_recipe(None, ["variants=[{name: dpo, epochs: 1}, {name: simpo, loss: simpo}, {name: orpo, loss: orpo, start: base}]",
                                "dpo.simpo_gamma=0.8"])
    assert [recipe.dpo_for(v).loss.value for v in recipe.variants] == ["sigmoid", "simpo", "orpo"]
    stages = plan(recipe)
    assert "loss" not in stages["dpo-dpo"][1]["variant"]  # a variant without its own loss keeps its config hash
    assert stages["dpo-simpo"][1]["variant"]["simpo_gamma"] == 0.8  # gamma enters where simpo reads it
    for bad, key in (("variants=[{name: o, loss: orpo}]", "variants[0].loss"),
                     ("variants=[{name: s, method: sft, loss: simpo}]", "variants[0].loss")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_recipe(None, [bad, "dpo.chosen_nll=0.5"])
