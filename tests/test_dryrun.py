"""`dalign run --dry-run` on a real-model recipe: the plan for the paper's Zephyr-7B recipe,
worked out offline from the recipe's stated architecture, without loading a weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalign.config import ConfigError, load_recipe
from dalign.dryrun import GIB, dry_run, memory_per_gpu, model_on_meta

ZEPHYR = Path(__file__).resolve().parent.parent / "recipes" / "zephyr-7b-beta.yaml"


def test_the_zephyr_plan_states_size_batches_and_steps(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = dry_run(load_recipe(ZEPHYR))
    assert "7.24B parameters" in plan
    assert "global batch 512 = 8 per device x 4 accumulation x 16 processes" in plan
    assert "global batch 32 = 2 per device x 1 accumulation x 16 processes" in plan
    assert "207865 rows x 1 epochs = 406 steps" in plan  # ceil(207865 / 512)
    assert "61135 rows x 3 epochs = 5732 steps" in plan  # ceil(3 * 61135 / 32)


def test_the_model_is_built_without_storage(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = model_on_meta(load_recipe(ZEPHYR))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_memory_estimate_by_hand():
    recipe = load_recipe(None, ["real.model=x", "real.dtype=bfloat16", "real.processes=4", "real.sharding=zero3"])
    params = 1_000_000_000
    est = memory_per_gpu(params, params, recipe, with_reference=True)
    # bf16 weights, twice (policy and reference), 2 bytes of gradients, 12 of AdamW states, all over 4 GPUs.
    assert est["weights"] == pytest.approx(2 * 2 * params / 4 / GIB)
    assert est["gradients"] == pytest.approx(2 * params / 4 / GIB)
    assert est["optimizer"] == pytest.approx(12 * params / 4 / GIB)
    unsharded = memory_per_gpu(params, params, recipe.model_copy(update={"real": recipe.real.model_copy(
        update={"sharding": "none"})}), with_reference=False)
    assert unsharded["total"] == pytest.approx(16 * params / GIB)


def test_a_recipe_without_a_real_model_is_refused():
    with pytest.raises(ValueError, match="real:"):
        dry_run(load_recipe(None))


def test_bad_real_settings_name_the_key():
    with pytest.raises(ConfigError, match="real.sharding"):
        load_recipe(None, ["real.model=x", "real.sharding=zero9"])
