"""Variants that name their preference loss, run through the recipe beside plain dDPO: the micro
run's stages reused, a SimPO and an ORPO variant added (both reference-free), then evaluated and
reported."""

from __future__ import annotations

import json
import shutil

from micro import RECIPE

from dalign.cli import main

VARIANTS = ("variants: [{{name: main}}, {{name: nosft, start: base}}]",
            "variants: [{{name: main}}, {{name: nosft, start: base}}, {{name: simpo, loss: simpo, beta: 2.0}}, "
            "{{name: orpo, loss: orpo, start: base}}]")


def test_simpo_and_orpo_variants_train_without_a_reference_pass_and_get_their_rows(micro_run, tmp_path, capsys):
    _, run_dir, code, _, _ = micro_run
    assert code == 0
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "evaluate")  # its config names the models it scores: two more now
    recipe = tmp_path / "variants.yaml"
    recipe.write_text(RECIPE.replace(*VARIANTS).format(run_dir=copy))
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    for kept in ("base", "sft", "pairs", "dpo-main", "dpo-nosft"):
        assert f"[{kept}] complete in {copy / kept}, skipped" in out  # the new variants' config left theirs alone
    for name in ("dpo-simpo", "dpo-orpo"):
        manifest = json.loads((copy / name / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["reference_logps_key"] is None
        assert not (copy / name / "reference_logps.json").exists()
    assert json.loads((copy / "dpo-main" / "manifest.json").read_text())["reference_logps_key"]
    results = json.loads((copy / "evaluate" / "manifest.json").read_text())["results"]
    assert {"dpo-simpo", "dpo-orpo"} <= set(results) and "score" in results["dpo-orpo"]
    md = (copy / "report" / "report.md").read_text()
    assert "| dpo-simpo | dSFT + SimPO (1 epoch) |" in md and "| dpo-orpo | ORPO on the base model, no SFT (1 epoch) |" in md
    assert "| dDPO on the base model, no SFT | 4.76 | 30.76 | dpo-nosft |" in md  # Table 3's row stays plain dDPO's
