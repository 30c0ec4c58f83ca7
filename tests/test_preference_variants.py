"""Variants that name their preference loss, run through the recipe beside plain dDPO: the micro
run's stages reused, a SimPO and an ORPO variant added (both reference-free) and two KTO variants
(from the pairs, and from every rated completion) and ORPO on the dSFT data and the pairs,
then evaluated and reported."""

from __future__ import annotations

import json
import shutil

from micro import RECIPE

from dalign.cli import main

VARIANTS = ("variants: [{{name: main}}, {{name: nosft, start: base}}]",
            "variants: [{{name: main}}, {{name: nosft, start: base}}, {{name: simpo, loss: simpo, beta: 2.0}}, "
            "{{name: orpo, loss: orpo, start: base}}, {{name: kto, loss: kto}}, "
            "{{name: kto-rated, loss: kto, rows: ratings, desirable_score: 3.5}}, "
            "{{name: orpo-sft, loss: orpo, start: base, sft_data: true}}]")


def test_simpo_orpo_and_kto_variants_train_and_get_their_rows(micro_run, tmp_path, capsys):
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
    from dalign.data import read_rows

    kto, rated = (json.loads((copy / name / "manifest.json").read_text()) for name in ("dpo-kto", "dpo-kto-rated"))
    train_pairs = read_rows(copy / "pairs" / "train.jsonl")
    assert kto["rows"]["kept"] == 2 * len(train_pairs) and kto["desirable_rows"] == len(train_pairs)
    assert kto["reference_logps_key"] and "rows_from" not in kto
    unpaired = read_rows(copy / "dpo-kto-rated" / "unpaired.jsonl")
    assert rated["rows_from"] == "ratings" and rated["rows"]["kept"] == len(unpaired) > kto["rows"]["kept"]
    assert rated["desirable_rows"] == sum(r["score"] >= 3.5 for r in unpaired) == sum(r["label"] for r in unpaired)
    orpo_sft, sft = (json.loads((copy / name / "manifest.json").read_text()) for name in ("dpo-orpo-sft", "sft"))
    assert orpo_sft["sft_rows"] == sft["rows"]["kept"] + sft["rows"]["replay"] > 0  # the dSFT stage's data
    assert orpo_sft["sft_data"]["replay"] == sft["rows"]["replay"] and orpo_sft["rows"]["kept"] == len(train_pairs)
    held_out = {r["prompt_id"] for r in read_rows(copy / "pairs" / "test.jsonl")}
    assert {r["prompt_id"] for r in train_pairs} <= {r["prompt_id"] for r in unpaired} and held_out
    assert not held_out & {r["prompt_id"] for r in unpaired}  # the pairs' training prompts only
    results = json.loads((copy / "evaluate" / "manifest.json").read_text())["results"]
    assert {"dpo-simpo", "dpo-orpo", "dpo-kto", "dpo-kto-rated"} <= set(results) and "score" in results["dpo-kto"]
    md = (copy / "report" / "report.md").read_text()
    assert "| dpo-simpo | dSFT + SimPO (1 epoch) |" in md and "| dpo-orpo | ORPO on the base model, no SFT (1 epoch) |" in md
    assert "| dpo-orpo-sft | ORPO from the base model on the dSFT data and the pairs, one stage (1 epoch) |" in md
    assert "| dpo-kto | dSFT + KTO (1 epoch) |" in md and "| dpo-kto-rated | dSFT + KTO on every rated completion (desirable from 3.5) (1 epoch) |" in md
    assert "| dDPO on the base model, no SFT | 4.76 | 30.76 | dpo-nosft |" in md  # Table 3's row stays plain dDPO's
