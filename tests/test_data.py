import copy
import functools
import json
import pickle

import pytest

from dalign.data import (
    ReadReport, RowError, append_rows, read_rows, validate_dialogue, validate_preference, write_rows,
)


def msg(role, content="hi"):
    return {"role": role, "content": content}


GOOD = {"id": "d1", "messages": [msg("system", "be nice"), msg("user", "héllo 🙂"), msg("assistant", "hi")],
        "source": "ultrachat"}


def mutated(fn):
    row = copy.deepcopy(GOOD)
    fn(row)
    return row


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    rows = [GOOD, mutated(lambda r: r.update(id="d2", messages=r["messages"][1:]))]
    path = tmp_path / f"sub/x{suffix}"
    assert write_rows(path, rows) == 2
    back = read_rows(path, validate=validate_dialogue)
    assert back == rows
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_read_json_list(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([GOOD, "oops"]), encoding="utf-8")
    assert read_rows(path, skip_bad=True) == [GOOD]
    with pytest.raises(RowError, match=r"x\.json, row 2: row is str"):
        read_rows(path)


BAD = [  # (row or raw line, field, reason)
    (mutated(lambda r: r["messages"][1].update(role="bot")), "messages[1].role", "unknown_role"),
    (mutated(lambda r: r["messages"][2].update(content="")), "messages[2].content", "empty_content"),
    (mutated(lambda r: r["messages"][2].update(content=" \n\t")), "messages[2].content", "empty_content"),
    (mutated(lambda r: r["messages"][1].update(content=["hi"])), "messages[1].content", "wrong_type"),
    (mutated(lambda r: r.pop("messages")), "messages", "missing_field"),
    (mutated(lambda r: r.update(messages=[])), "messages", "empty_field"),
    (mutated(lambda r: r.update(id=7)), "id", "wrong_type"),
    (mutated(lambda r: r["messages"][1].update(name="x")), "messages[1].name", "extra_field"),
    (mutated(lambda r: r["messages"].insert(2, msg("user"))), "messages[2].role", "bad_order"),
    (mutated(lambda r: r["messages"].append(msg("system"))), "messages[3].role", "bad_order"),
    (mutated(lambda r: r.update(messages=[msg("assistant"), msg("user")])), "messages[0].role", "bad_order"),
    (mutated(lambda r: r["messages"].append(msg("user"))), "messages[3].role", "bad_final_turn"),
    ('{"id": "x", "messages": [', None, "malformed_json"),
    ("[1, 2]", None, "wrong_type"),
]


@pytest.mark.parametrize("bad,field,reason", BAD)
def test_bad_row_names_file_row_and_field(tmp_path, bad, field, reason):
    line = bad if isinstance(bad, str) else json.dumps(bad)
    # Blank line 2 still counts, so the bad row is row 4.
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(RowError) as info:
        read_rows(path, validate=validate_dialogue)
    err = info.value
    assert (err.row, err.field, err.reason) == (4, field, reason)
    assert str(err).startswith(f"{path}, row 4")
    if field:
        assert f"field {field}: " in str(err)
    assert pickle.loads(pickle.dumps(err)).row == 4


def test_error_message_format():
    bad = mutated(lambda r: r["messages"][1].update(role="bot"))
    with pytest.raises(RowError) as info:
        validate_dialogue(bad)
    err = info.value
    err.path, err.row = "data/x.jsonl", 3
    assert str(err) == ("data/x.jsonl, row 3, field messages[1].role: unknown role 'bot' "
                        "(expected one of system, user, assistant)")


def test_final_user_allowed_for_prompts(tmp_path):
    prompt = mutated(lambda r: r["messages"].append(msg("user")))
    path = tmp_path / "p.jsonl"
    write_rows(path, [prompt])
    lenient = functools.partial(validate_dialogue, require_final_assistant=False)
    assert read_rows(path, validate=lenient) == [prompt]
    with pytest.raises(RowError, match="only a system message"):
        lenient({"id": "x", "messages": [msg("system")]})


def test_skip_bad_counts_reasons(tmp_path, caplog):
    lines = [json.dumps(GOOD), "not json", json.dumps(BAD[0][0]), json.dumps(BAD[1][0]),
             json.dumps(BAD[2][0]), json.dumps({**GOOD, "id": "d9"})]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    report = ReadReport(str(path))
    with caplog.at_level("WARNING", logger="dalign.data"):
        rows = read_rows(path, validate=validate_dialogue, skip_bad=True, report=report)
    assert [r["id"] for r in rows] == ["d1", "d9"]
    assert report.as_dict()["dropped"] == {"empty_content": 2, "malformed_json": 1, "unknown_role": 1}
    assert report.kept == 2
    assert report.examples[0].startswith(f"{path}, row 2")
    assert "row 3, field messages[1].role" in caplog.text


def test_append_rows_survives_partial_line(tmp_path):
    path = tmp_path / "a.jsonl"
    assert append_rows(path, [GOOD]) == 1
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "torn", "mess')  # a crash mid-write
    assert append_rows(path, [{**GOOD, "id": "d2", "note": "a\nb"}]) == 1
    report = ReadReport(str(path))
    rows = read_rows(path, validate=validate_dialogue, skip_bad=True, report=report)
    assert [r["id"] for r in rows] == ["d1", "d2"] and rows[1]["note"] == "a\nb"
    assert report.dropped == {"malformed_json": 1}


def test_jsonl_readable_by_pyarrow_json(tmp_path):
    import pyarrow.json as paj

    path = tmp_path / "x.jsonl"
    write_rows(path, [GOOD, {**GOOD, "id": "d2"}])
    table = paj.read_json(path)
    assert table.num_rows == 2 and table.to_pylist()[0]["messages"] == GOOD["messages"]


def test_jsonl_loadable_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "x.jsonl"
    write_rows(path, [GOOD, {**GOOD, "id": "d2"}])
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds[0]["messages"] == GOOD["messages"] and ds[1]["id"] == "d2"


PREF = {"prompt": [msg("system", "s"), msg("user", "q")], "chosen": [msg("assistant", "good")],
        "rejected": [msg("assistant", "bad")], "score_chosen": 9.0}


@pytest.mark.parametrize("change,field,reason", [
    (lambda r: r["prompt"].append(msg("assistant")), "prompt[2].role", "bad_final_turn"),
    (lambda r: r.update(chosen=[]), "chosen", "empty_field"),
    (lambda r: r.pop("rejected"), "rejected", "missing_field"),
    (lambda r: r.update(rejected=[msg("user")]), "rejected[0].role", "bad_order"),
    (lambda r: r["chosen"][0].update(content=None), "chosen[0].content", "wrong_type"),
    (lambda r: r.update(prompt="q"), "prompt", "wrong_type"),
])
def test_preference(change, field, reason):
    validate_preference(PREF)
    row = copy.deepcopy(PREF)
    change(row)
    with pytest.raises(RowError) as info:
        validate_preference(row)
    assert (info.value.field, info.value.reason) == (field, reason)
