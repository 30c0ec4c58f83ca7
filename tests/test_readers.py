import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dalign.data import ReadReport, RowError, read_rows, validate_dialogue, validate_preference, write_rows
from dalign.readers import (
    SourceConfig, SourceError, read_alpaca_eval, read_dialogues, read_mt_bench, read_preferences, read_prompts,
)

# The real samples live beside the repository (/work/shared/data for /work/main); see their README.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data samples not found at {DATA}")
MT_BENCH = DATA / "mt_bench" / "question.jsonl"
ALPACA = DATA / "alpaca_eval" / "instructions_805.json"
DAVINCI = DATA / "alpaca_eval" / "baseline_text_davinci_003_outputs.json"
ULTRA = DATA / "ultrafeedback" / "ultrafeedback_binarized_subset_train_1000.jsonl"


def src(path, **kw):
    return SourceConfig(path=str(path), **kw)


def raw_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_parquet(path, rows):
    # Columns from the union of keys: from_pylist takes only the first row's (MT-Bench's has no reference).
    keys = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in keys}), path)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --- real samples --------------------------------------------------------------------------------

@needs_data
def test_mt_bench_real_questions():
    rows = read_mt_bench(src(MT_BENCH))
    assert len(rows) == 80
    assert sorted(r["question_id"] for r in rows) == list(range(81, 161))
    per_category = collections.Counter(r["category"] for r in rows)
    assert len(per_category) == 8 and set(per_category.values()) == {10}
    assert all(len(r["turns"]) == 2 for r in rows)
    for r in rows:
        if r["category"] in ("math", "reasoning"):
            assert r["reference"] and r["reference"][0].strip(), r["question_id"]
    # FastChat gives references to 9 of 10 coding questions; none to writing or humanities.
    assert sum(r["reference"] is not None for r in rows if r["category"] == "coding") == 9
    assert all(r["reference"] is None for r in rows if r["category"] in ("writing", "humanities"))
    assert set(rows[0]) == {"question_id", "category", "turns", "reference"}


@needs_data
def test_alpaca_eval_real_files():
    outputs, baseline = read_alpaca_eval(src(ALPACA)), read_alpaca_eval(src(DAVINCI))
    assert len(outputs) == len(baseline) == 805
    assert [r["instruction"] for r in outputs] == [r["instruction"] for r in baseline]
    assert {r["generator"] for r in baseline} == {"text_davinci_003"}
    assert collections.Counter(r["dataset"] for r in baseline) == {
        "selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129, "vicuna": 80}
    # The davinci baseline has two empty answers; they are answers, kept so all 805 instructions stay.
    assert sum(not r["output"].strip() for r in baseline) == 2
    assert set(outputs[0]) == {"instruction", "output", "generator", "dataset"}  # datasplit is not carried


@needs_data
def test_ultrafeedback_real_strict_names_first_bad_row():
    with pytest.raises(RowError) as e:
        read_preferences(src(ULTRA))
    err = e.value
    assert (err.path, err.row, err.field, err.reason) == (str(ULTRA), 307, "rejected", "identical_pair")
    assert f"{ULTRA}, row 307, field rejected" in str(err)


@needs_data
def test_ultrafeedback_real_converted_and_counted():
    report = ReadReport(str(ULTRA))
    rows = read_preferences(src(ULTRA, columns={"prompt_id": "source_index"}), skip_bad=True, report=report)
    raw = raw_jsonl(ULTRA)
    # 4 pairs with the same text on both sides and 2 empty answers are counted, not silently dropped.
    assert report.kept == len(rows) == 994
    assert report.dropped == {"identical_pair": 4, "empty_content": 2}
    assert report.kept + sum(report.dropped.values()) == len(raw) == 1000
    assert any("row 834, field chosen" in x for x in report.examples)
    by_id = {str(r["source_index"]): r for r in raw}
    assert len({r["prompt_id"] for r in rows}) == 994
    for row in rows:
        validate_preference(row)
        assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert row["chosen"] != row["rejected"]
        src_row = by_id[row["prompt_id"]]
        assert row["prompt"] == [user(src_row["prompt"])]
        assert row["chosen"] == [assistant(src_row["chosen"])]
        assert row["score_chosen"] == src_row["metadata"]["score_chosen"]
        assert row["score_rejected"] == src_row["metadata"]["score_rejected"]
        assert isinstance(row["score_chosen"], float) and row["score_chosen"] >= row["score_rejected"]


@needs_data
def test_ultrafeedback_rows_readable_by_dalign(tmp_path):
    rows = read_preferences(src(ULTRA, limit=100), skip_bad=True)
    out = tmp_path / "pairs.jsonl"
    write_rows(out, rows)
    assert read_rows(out, validate=validate_preference) == rows


# --- formats ---------------------------------------------------------------------------------------

@needs_data
def test_parquet_and_json_round_trips(tmp_path):
    raw = raw_jsonl(ULTRA)[:50]
    expected = read_preferences(src(ULTRA, limit=50), skip_bad=True)
    assert read_preferences(src(write_parquet(tmp_path / "u.parquet", raw)), skip_bad=True) == expected

    questions = raw_jsonl(MT_BENCH)  # reference is absent in some rows: a parquet null
    expected = read_mt_bench(src(MT_BENCH))
    assert read_mt_bench(src(write_parquet(tmp_path / "q.parquet", questions))) == expected
    (tmp_path / "list.json").write_text(json.dumps(questions))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": questions}))
    assert read_mt_bench(src(tmp_path / "list.json")) == expected
    assert read_mt_bench(src(tmp_path / "wrapped.json")) == expected


@needs_data
def test_hub_message_list_formats_match_string_format(tmp_path):
    raw = raw_jsonl(ULTRA)[:40]
    expected = read_preferences(src(ULTRA, limit=40), skip_bad=True)
    # HuggingFaceH4/ultrafeedback_binarized: prompt str, chosen/rejected repeat the user turn, scores top-level.
    h4 = [{"prompt": r["prompt"], "prompt_id": str(r["source_index"]),
           "chosen": [user(r["prompt"]), assistant(r["chosen"])],
           "rejected": [user(r["prompt"]), assistant(r["rejected"])], **r["metadata"]} for r in raw]
    # trl-lib/ultrafeedback_binarized: no prompt column, the prompt is chosen's user turn.
    trl = [{k: v for k, v in row.items() if k not in ("prompt", "prompt_id")} for row in h4]
    got_h4 = read_preferences(src(write_parquet(tmp_path / "h4.parquet", h4)), skip_bad=True)
    got_trl = read_preferences(src(write_parquet(tmp_path / "trl.parquet", trl)), skip_bad=True)
    ignore_id = lambda rows: [{k: v for k, v in r.items() if k != "prompt_id"} for r in rows]  # noqa: E731
    assert ignore_id(got_h4) == ignore_id(got_trl) == ignore_id(expected)
    assert [r["prompt_id"] for r in got_h4] == [str(r["source_index"]) for r in raw if r["chosen"] != r["rejected"]]


def test_dialogues_ultrachat_style(tmp_path):
    rows = [{"prompt": "Name a colour.", "prompt_id": "p1",
             "messages": [user("Name a colour."), assistant("Blue."), user("Another?"), assistant("Red.")]},
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello.")]}]
    got = read_dialogues(src(write_parquet(tmp_path / "uc.parquet", rows)))
    assert [set(r) for r in got] == [{"id", "messages"}] * 2
    assert got[0] == {"id": "p1", "messages": rows[0]["messages"]}
    # No id in the source: the hub's convention, a sha256 of the first user turn.
    assert got[1]["id"] == "3639efcd08abb273b1619e82e78c29a7df02c1051b1820e99fc395dcaa3326b8"
    for row in got:
        validate_dialogue(row)


# --- columns, parts, config ----------------------------------------------------------------------

def test_column_mapping_and_errors_name_the_source_column(tmp_path):
    rows = [{"conversation": [user("Hi"), assistant("Hello.")], "uid": 7},
            {"conversation": [user("Hi"), {"role": "bot", "content": "Hello."}], "uid": 8}]
    path = tmp_path / "c.jsonl"
    write_rows(path, rows)
    cols = {"messages": "conversation", "id": "uid"}
    report = ReadReport(str(path))
    got = read_dialogues(src(path, columns=cols), skip_bad=True, report=report)
    assert got == [{"id": "7", "messages": rows[0]["conversation"]}]
    assert report.dropped == {"unknown_role": 1}
    with pytest.raises(RowError) as e:
        read_dialogues(src(path, columns=cols))
    assert (e.value.row, e.value.field) == (2, "conversation[1].role")
    with pytest.raises(RowError) as e:
        read_dialogues(src(path, columns={"messages": "dialogue"}))
    assert (e.value.row, e.value.field, e.value.reason) == (1, "dialogue", "missing_field")
    with pytest.raises(SourceError, match="unknown field 'mesages'"):
        read_dialogues(src(path, columns={"mesages": "conversation"}))

    alpaca = tmp_path / "a.jsonl"
    write_rows(alpaca, [{"instruction": "Say hi.", "output": "Hi!", "worse": "hi", "gen": "m"}])
    got = read_preferences(src(alpaca, columns={"prompt": "instruction", "chosen": "output", "rejected": "worse"}))
    assert got[0]["prompt"] == [user("Say hi.")] and got[0]["rejected"] == [assistant("hi")]
    assert got[0]["score_chosen"] is None


@needs_data
def test_offset_limit_parts_are_disjoint():
    parts = [read_mt_bench(src(MT_BENCH, limit=30)), read_mt_bench(src(MT_BENCH, offset=30, limit=30)),
             read_mt_bench(src(MT_BENCH, offset=60))]
    ids = [{r["question_id"] for r in p} for p in parts]
    assert [len(i) for i in ids] == [30, 30, 20]
    assert not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])
    assert set().union(*ids) == set(range(81, 161))
    assert read_mt_bench(src(MT_BENCH, offset=500)) == []

    # Parts are cut by position, so bad rows do not shift them; errors keep the file's row numbers.
    reports = [ReadReport("a"), ReadReport("b")]
    train = read_preferences(src(ULTRA, limit=700), skip_bad=True, report=reports[0])
    held = read_preferences(src(ULTRA, offset=700), skip_bad=True, report=reports[1])
    assert [r.kept + sum(r.dropped.values()) for r in reports] == [700, 300]
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    with pytest.raises(RowError) as e:
        read_preferences(src(ULTRA, offset=300, limit=10))
    assert e.value.row == 307


def test_source_config_is_strict_and_documented():
    for bad in ({}, {"path": "a.jsonl", "dataset": "x/y", "split": "train"}, {"dataset": "x/y"},
                {"path": "a.jsonl", "split": "train"}, {"path": "a.jsonl", "offset": -1},
                {"path": "a.jsonl", "limit": 0}, {"path": "a.jsonl", "colums": {}}):
        with pytest.raises(ValidationError):
            SourceConfig(**bad)
    assert all(f.description for f in SourceConfig.model_fields.values())


# --- bad rows --------------------------------------------------------------------------------------

BAD_ROWS = [
    (read_dialogues, {"messages": [user("Hi"), {"role": "bot", "content": "Hi."}]}, "messages[1].role",
     "unknown_role"),
    (read_dialogues, {"messages": [user("   "), assistant("Hi.")]}, "messages[0].content", "empty_content"),
    (read_dialogues, {"prompt": "Hi"}, "messages", "missing_field"),
    (read_dialogues, {"messages": [user("Hi")]}, "messages[0].role", "bad_final_turn"),
    (read_preferences, {"prompt": "Q?", "chosen": "A"}, "rejected", "missing_field"),
    (read_preferences, {"prompt": "Q?", "chosen": "A", "rejected": ""}, "rejected", "empty_content"),
    (read_preferences, {"prompt": "Q?", "chosen": [user("Other?"), assistant("A")], "rejected": "B"}, "chosen",
     "prompt_mismatch"),
    (read_preferences, {"prompt": "Q?", "chosen": "A", "rejected": "B", "metadata": {"score_chosen": "high"}},
     "metadata.score_chosen", "wrong_type"),
    (read_mt_bench, {"question_id": 1, "category": "math", "turns": ["Q1", ""]}, "turns[1]", "empty_content"),
    (read_mt_bench, {"question_id": 1, "turns": ["Q1"]}, "category", "missing_field"),
    (read_alpaca_eval, {"instruction": "Do it.", "output": "Done."}, "generator", "missing_field"),
]


@pytest.mark.parametrize("reader,bad,field,reason", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, reader, bad, field, reason):
    good = {read_dialogues: {"messages": [user("Hi"), assistant("Hello.")]},
            read_preferences: {"prompt": "Q?", "chosen": "A", "rejected": "B"},
            read_mt_bench: {"question_id": 1, "category": "math", "turns": ["Q1", "Q2"]},
            read_alpaca_eval: {"instruction": "Do it.", "output": "Done.", "generator": "m"}}[reader]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n", encoding="utf-8")
    with pytest.raises(RowError) as e:
        reader(src(path))
    assert (e.value.path, e.value.row, e.value.field, e.value.reason) == (str(path), 3, field, reason)
    assert str(e.value).startswith(f"{path}, row 3, field {field}: ")
    report = ReadReport(str(path))
    assert len(reader(src(path), skip_bad=True, report=report)) == 3
    assert (report.kept, dict(report.dropped)) == (3, {reason: 1})


def test_malformed_json_line_and_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "generator": "m"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(RowError) as e:
        read_alpaca_eval(src(path))
    assert (e.value.row, e.value.reason) == (2, "malformed_json")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(RowError, match="neither a list"):
        read_alpaca_eval(src(tmp_path / "bad.json"))


# --- hub ---------------------------------------------------------------------------------------------

def test_hub_ids_offline(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "local_dataset"  # a folder id loads through load_dataset like a hub id, with no network
    folder.mkdir()
    rows = [{"question_id": i, "category": "math", "turns": [f"Q{i}", "again"]} for i in range(1, 21)]
    rows[12]["turns"] = []
    write_rows(folder / "train.jsonl", rows)
    code = textwrap.dedent(f"""
        import json
        from dalign.data import ReadReport
        from dalign.readers import SourceConfig, SourceError, read_mt_bench
        try:
            read_mt_bench(SourceConfig(dataset="dalign-test/no-such-dataset-3f9a", split="train"))
        except SourceError as err:
            print(json.dumps(str(err)))
        report = ReadReport("local")
        part = read_mt_bench(SourceConfig(dataset={str(folder)!r}, split="train", offset=10, limit=5),
                             skip_bad=True, report=report)
        print(json.dumps([[r["question_id"] for r in part], report.examples]))
    """)
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, hence a fresh process; an empty
    # HF_HOME makes sure nothing is cached. The timeout turns a hang into a failure.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    message, (ids, examples) = map(json.loads, done.stdout.splitlines())
    assert "dalign-test/no-such-dataset-3f9a split train (HF_HUB_OFFLINE is set)" in message
    assert "download it first" in message and "give a local" in message
    # The part is rows 11-15 of the split; the bad one is named by its row in the whole split.
    assert ids == [11, 12, 14, 15]
    assert len(examples) == 1 and examples[0].startswith(f"{folder} split train, row 13, field turns: ")


@needs_data
def test_ai_feedback_prompts_from_real_files():
    # UltraFeedback's `prompt` strings and AlpacaEval's `instruction`s both become single user turns.
    uf, alpaca = read_prompts(src(ULTRA, limit=50)), read_prompts(src(ALPACA))
    assert len(uf) == 50 and len(alpaca) == 805
    assert uf[0]["prompt"] == [{"role": "user", "content": json.loads(ULTRA.read_text().splitlines()[0])["prompt"]}]
    assert alpaca[3]["prompt"][0]["content"] == json.loads(ALPACA.read_text())[3]["instruction"]
    assert len({r["prompt_id"] for r in uf}) == 50


def test_prompts_bad_rows_are_named(tmp_path):
    write_rows(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}, {"prompt": [{"role": "assistant", "content": "x"}]},
                                      {"instruction": "  "}])
    report = ReadReport(str(tmp_path / "p.jsonl"))
    rows = read_prompts(src(tmp_path / "p.jsonl"), skip_bad=True, report=report)
    assert [r["prompt"][0]["content"] for r in rows] == ["ok"]
    assert sum(report.dropped.values()) == 3 and "row 2" in report.examples[0]
    with pytest.raises(RowError, match="row 4.*instruction"):
        read_prompts(src(tmp_path / "p.jsonl", offset=3))
