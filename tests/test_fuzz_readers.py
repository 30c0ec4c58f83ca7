"""Fuzz every reader with seeded corruptions of real sample rows.

Each case takes a 20-row slice of a real sample in /work/shared/data (or dalign-format rows the
readers make from it), writes it as JSON lines, a JSON list and Parquet, corrupts it, and reads it
with ``skip_bad=False`` and ``skip_bad=True``. Either the reader returns rows that are valid per
its schema, with kept + dropped equal to the rows in the file, or it raises RowError/SourceError
naming the file and, for a bad row, the row and the field. Any other exception, or a call that
takes more than READ_SECONDS, fails the test.

Corruptions tried: 736 in all, 92 per case (8 cases: 5 readers over 6 sources, and read_rows on
dalign dialogue and preference files), that is per case 34 on .jsonl, 34 on .json and 24 on
.parquet: 17, 17 and 12 kinds, each drawn TRIES_PER_KIND=2 times with its own seed (a test below
keeps this figure in step with the code). The same seeds give the same files on every run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalign.data import MAX_EXAMPLES, ReadReport, RowError, read_rows, validate_dialogue, validate_preference
from dalign.readers import (SourceConfig, SourceError, read_alpaca_eval, read_dialogues, read_mt_bench,
                            read_preferences, read_prompts)

# The real samples live beside the repository (/work/shared/data for /work/main), as in test_readers.py.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data samples not found at {DATA}")

SLICE = 20  # rows per sample: enough for every field shape, small enough to stay fast
TRIES_PER_KIND = 2
READ_SECONDS = 5  # a reader call slower than this on 20 rows (one of them up to 10 MB) counts as a hang
CORRUPTIONS_TRIED = 736  # the figure in the docstring; test_corruption_count keeps it true


# --- cases: a reader, its sample rows, and what a valid output row is ----------------------------

def _jsonl(path: Path, limit: int = SLICE, step: int = 1) -> list[dict]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines[::step][:limit]]


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _writable(row: dict) -> None:
    # read_source writes what a reader returns with write_rows: strict JSON, UTF-8.
    json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8")


def check_question(row: dict) -> None:
    assert set(row) == {"question_id", "category", "turns", "reference"}
    assert isinstance(row["question_id"], (int, str)) and not isinstance(row["question_id"], bool)
    assert _nonempty_str(row["category"])
    assert row["turns"] and all(_nonempty_str(t) for t in row["turns"])
    assert row["reference"] is None or (row["reference"] and all(isinstance(t, str) for t in row["reference"]))
    _writable(row)


def check_alpaca(row: dict) -> None:
    assert set(row) == {"instruction", "output", "generator", "dataset"}
    assert _nonempty_str(row["instruction"]) and isinstance(row["output"], str) and _nonempty_str(row["generator"])
    assert row["dataset"] is None or _nonempty_str(row["dataset"])
    _writable(row)


def check_preference(row: dict) -> None:
    assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    validate_preference(row)
    assert _nonempty_str(row["prompt_id"]) and row["chosen"] != row["rejected"]
    for key in ("score_chosen", "score_rejected"):
        assert row[key] is None or (type(row[key]) is float and math.isfinite(row[key]))
    _writable(row)


def check_prompt(row: dict) -> None:
    assert set(row) == {"prompt_id", "prompt"}
    validate_dialogue({"id": row["prompt_id"], "messages": row["prompt"]}, require_final_assistant=False)
    assert row["prompt"][-1]["role"] == "user"
    _writable(row)


def check_dialogue(row: dict) -> None:
    assert set(row) == {"id", "messages"}
    validate_dialogue(row)
    _writable(row)


def ultrachat_style(rows: list[dict]) -> list[dict]:
    """ultrachat_200k-shaped rows (prompt, prompt_id, messages) from UltraFeedback pairs; every
    third opens with a system turn and every other one has a second exchange, for varied shapes."""
    out = []
    for i, r in enumerate(rows):
        messages = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        if i % 2:
            messages += [{"role": "user", "content": "Say it another way."},
                         {"role": "assistant", "content": r["rejected"]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        out.append({"prompt": r["prompt"], "prompt_id": f"uf-{r['source_index']}", "messages": messages})
    return out


def read_dialogues_of(rows: list[dict]) -> list[dict]:
    # read_dialogues takes a file, so the rows go through a temporary one.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uc.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return read_dialogues(SourceConfig(path=str(path)))


def _source_reader(reader: Callable, columns: dict | None = None) -> Callable:
    def read(path: Path, **kw) -> list[dict]:
        return reader(SourceConfig(path=str(path), columns=columns or {}), **kw)
    return read


@dataclasses.dataclass(frozen=True)
class Case:
    read: Callable[..., list[dict]]  # (path, skip_bad=, report=) -> rows
    sample: Callable[[], list[dict]]  # the clean rows to corrupt
    check_row: Callable[[dict], None]  # asserts one returned row is valid
    wraps_data: bool = True  # a .json file may be {"data": [...]} (the readers; read_rows takes only a list)


ULTRA = DATA / "ultrafeedback" / "ultrafeedback_binarized_subset_train_1000.jsonl"
CASES = {
    # Every 4th question: all 8 categories, with and without reference.
    "mt_bench": Case(_source_reader(read_mt_bench), lambda: _jsonl(DATA / "mt_bench" / "question.jsonl", step=4),
                     check_question),
    "alpaca_eval": Case(_source_reader(read_alpaca_eval),
                        lambda: json.loads((DATA / "alpaca_eval" / "instructions_805.json").read_text())[:SLICE],
                        check_alpaca),
    "preferences": Case(_source_reader(read_preferences), lambda: _jsonl(ULTRA), check_preference),
    "prompts": Case(_source_reader(read_prompts), lambda: _jsonl(ULTRA), check_prompt),
    # ARC questions as prompts through a column mapping, so errors must name the source's column.
    "prompts_arc": Case(_source_reader(read_prompts, {"prompt": "question"}),
                        lambda: _jsonl(DATA / "arc" / "arc_challenge_test.jsonl"), check_prompt),
    "dialogues": Case(_source_reader(read_dialogues), lambda: ultrachat_style(_jsonl(ULTRA)), check_dialogue),
    # dalign's own row files, in the shapes the readers above write.
    "dalign_dialogues": Case(functools.partial(read_rows, validate=validate_dialogue),
                             lambda: read_dialogues_of(ultrachat_style(_jsonl(ULTRA))), validate_dialogue,
                             wraps_data=False),
    "dalign_preferences": Case(functools.partial(read_rows, validate=validate_preference),
                               lambda: read_preferences(SourceConfig(path=str(ULTRA), limit=SLICE)),
                               validate_preference, wraps_data=False),
}


@functools.cache
def sample(case: str) -> tuple[dict, ...]:
    return tuple(CASES[case].sample())


# --- writing rows with raw JSON the json module will not write -----------------------------------

RAW_JSON: dict[str, bytes] = {}  # placeholder string -> the JSON text written in its place


def raw_json(text: bytes) -> str:
    """A placeholder for JSON text that json.dumps will not write: deep nesting, 5000-digit
    numbers, lone surrogates; the file gets ``text`` verbatim where the placeholder is."""
    key = f"@@raw{len(RAW_JSON)}@@"
    RAW_JSON[key] = text
    return key


def _json_bytes(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False).encode("utf-8")
    for key, raw in RAW_JSON.items():
        text = text.replace(f'"{key}"'.encode(), raw)
    return text


def to_jsonl(rows: list) -> bytes:
    return b"".join(_json_bytes(row) + b"\n" for row in rows)


def to_json(rows: list) -> bytes:
    return _json_bytes(rows)


def to_parquet(rows: list[dict], compression: str = "snappy") -> bytes:
    # Columns from the union of keys, as write_rows does. Raises pyarrow's errors where the rows
    # mix types in a column, which Parquet cannot hold.
    keys = list(dict.fromkeys(k for row in rows for k in row))
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in keys}), sink,
                   compression=compression)
    return sink.getvalue()


def _read_parquet(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


WRITERS = {"jsonl": to_jsonl, "json": to_json, "parquet": to_parquet}


# --- row corruptions: change one row (Parquet: one row, else the whole column) ---------------------

WRONG_VALUES = [7, -1, 2.5, True, None, "text", "", {"x": 1}, [1, 2], [], {}, ["a"]]


def _random_spot(rng: random.Random, row: dict) -> tuple[Any, Any]:
    """(container, key) somewhere in the row: a top-level field or one nested in lists and objects."""
    container, key = row, rng.choice(list(row))
    while isinstance(container[key], (dict, list)) and container[key] and rng.random() < 0.6:
        container = container[key]
        key = rng.choice(list(container)) if isinstance(container, dict) else rng.randrange(len(container))
    return container, key


def _set_somewhere(value_of: Callable[[random.Random], Any]) -> Callable:
    def corrupt(rng: random.Random, row: dict) -> Any:
        container, key = _random_spot(rng, row)
        container[key] = value_of(rng)
        return row
    return corrupt


def _delete_somewhere(rng: random.Random, row: dict) -> Any:
    container, key = _random_spot(rng, row)
    del container[key]
    return row


def _add_key_somewhere(rng: random.Random, row: dict) -> Any:
    dicts = [row] + [v for v in _walk(row) if isinstance(v, dict)]
    rng.choice(dicts)[rng.choice(["unexpected", "role", "content", "id"])] = rng.choice(WRONG_VALUES)
    return row


def _walk(value: Any):
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        yield child
        yield from _walk(child)


def _huge_text(rng: random.Random) -> str:
    return "lorem ipsum é " * (rng.randint(1, 10) * 1024 * 1024 // 15)


def _deep_nesting(rng: random.Random) -> str:
    depth = rng.choice([50, 900, 100_000])  # 100k is past json's recursion limit
    return raw_json(b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth)


ROW_KINDS = {  # kind -> (rng, row) -> corrupted row
    "wrong_type": _set_somewhere(lambda rng: rng.choice(WRONG_VALUES)),
    "null_field": _set_somewhere(lambda rng: None),
    "missing_field": _delete_somewhere,
    "extra_key": _add_key_somewhere,
    "huge_string": _set_somewhere(_huge_text),
    "nan_infinity": _set_somewhere(lambda rng: rng.choice([math.nan, math.inf, -math.inf])),
}
JSON_ONLY_ROW_KINDS = {  # shapes Parquet cannot hold
    "deep_nesting": _set_somewhere(_deep_nesting),
    "huge_integer": _set_somewhere(lambda rng: raw_json(b"9" * rng.choice([400, 5000]))),  # 5000: past int limit
    "lone_surrogate": _set_somewhere(lambda rng: raw_json(rng.choice([b'"\\ud800"', b'"a \\udfff b"']))),
    "row_not_object": lambda rng, row: rng.choice([[1, 2], 42, "row", None, True, 2.5, [], [row]]),
}


def corrupt_rows(kind: str, rng: random.Random, rows: list[dict], fmt: str) -> tuple[bytes, int | None]:
    """The file's bytes and the 1-based row the fault is in (None when it is in every row)."""
    corrupt = {**ROW_KINDS, **JSON_ONLY_ROW_KINDS}[kind]
    RAW_JSON.clear()  # only this file's placeholders are looked for
    for _ in range(50):
        index, seed = rng.randrange(len(rows)), rng.random()
        bad = copy.deepcopy(rows)
        bad[index] = corrupt(random.Random(seed), bad[index])
        if fmt != "parquet":
            return WRITERS[fmt](bad), index + 1
        with contextlib.suppress(pa.ArrowException):
            data = to_parquet(bad)
            # A column's type is the union of its rows' (a key added to one message is a null in
            # every other): the fault is in one row only if the other rows read back unchanged.
            clean, back = _read_parquet(to_parquet(rows)), _read_parquet(data)
            unchanged = all(repr(back[i]) == repr(clean[i]) for i in range(len(rows)) if i != index)  # 81 != 81.0
            return data, index + 1 if unchanged else None
        # A column of mixed types is no Parquet file: corrupt the same spot in every row instead.
        bad = [corrupt(random.Random(seed), copy.deepcopy(row)) for row in rows]
        with contextlib.suppress(pa.ArrowException):
            return to_parquet(bad), None
    raise AssertionError(f"{kind}: no Parquet file in 50 draws")


# --- byte corruptions: damage the written file --------------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
NOT_ROWS = [b"42", b"null", b'"text"', b"[1, 2, 3]", b"{}", b'{"data": 5}', b"true", b"NaN", b"[[[]]]"]


def _truncated(rng, data: bytes, fmt: str) -> bytes:
    if fmt == "jsonl":  # the last line cut short, as a crash mid-write leaves it
        body = data.rstrip(b"\n")
        return body[:rng.randint(body.rfind(b"\n") + 2, len(body) - 1)]
    return data[:rng.randrange(len(data))]


def _flipped(rng, data: bytes, fmt: str) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def _invalid_utf8(rng, data: bytes, fmt: str) -> bytes:
    # Inside a string value, where a decoder meets it as text.
    quotes = [i for i, b in enumerate(data) if b == ord('"')]
    at = rng.choice(quotes) + 1
    return data[:at] + rng.choice(INVALID_UTF8) + data[at:]


def _bom_crlf(rng, data: bytes, fmt: str) -> bytes:
    if rng.random() < 0.5:
        data = data.replace(b"\n", b"\r\n")
    return b"\xef\xbb\xbf" + data if rng.random() < 0.7 else data


def _garbage_inserted(rng, data: bytes, fmt: str) -> bytes:
    at = data.find(b"\n", rng.randrange(len(data))) + 1 if fmt == "jsonl" else rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + (b"\n" if fmt == "jsonl" else b"") + data[at:]


TEXT_BYTE_KINDS = {  # kind -> (rng, clean file bytes, fmt) -> corrupted bytes
    "truncated": _truncated,
    "flipped_bytes": _flipped,
    "invalid_utf8": _invalid_utf8,
    "empty_file": lambda rng, data, fmt: rng.choice([b"", b"\n", b" \n\t\n"]),
    "not_rows": lambda rng, data, fmt: b"\n".join(rng.choices(NOT_ROWS, k=rng.randint(1, 3))) + b"\n",
    "bom_crlf": _bom_crlf,
    "garbage_inserted": _garbage_inserted,
}


def _parquet_invalid_utf8(rng, rows: list[dict]) -> bytes:
    # Uncompressed, so a string's bytes are in the file to overwrite with bytes that are not UTF-8.
    data = to_parquet(rows, compression="none")
    texts = [v for row in rows for v in [row, *_walk(row)] if isinstance(v, str) and len(v.encode()) > 8]
    encoded = rng.choice(texts).encode()
    at = data.find(encoded) + rng.randrange(len(encoded) - 4)
    bad = rng.choice(INVALID_UTF8)
    return data[:at] + bad + data[at + len(bad):]


PARQUET_BYTE_KINDS = {  # kind -> (rng, clean rows) -> corrupted bytes
    "truncated": lambda rng, rows: _truncated(rng, to_parquet(rows), "parquet"),
    "flipped_bytes": lambda rng, rows: _flipped(rng, to_parquet(rows, rng.choice(["none", "snappy"])), "parquet"),
    "invalid_utf8": _parquet_invalid_utf8,
    "empty_file": lambda rng, rows: b"",
    "not_rows": lambda rng, rows: rng.choice(NOT_ROWS + [to_jsonl(rows)]),  # not Parquet at all
    "garbage_parquet": lambda rng, rows: b"PAR1" + rng.randbytes(rng.randint(0, 2000)) + b"PAR1",
}

KINDS = {
    "jsonl": [*ROW_KINDS, *JSON_ONLY_ROW_KINDS, *TEXT_BYTE_KINDS],
    "json": [*ROW_KINDS, *JSON_ONLY_ROW_KINDS, *TEXT_BYTE_KINDS],
    "parquet": [*ROW_KINDS, *PARQUET_BYTE_KINDS],
}


def corrupted_file(case: str, fmt: str, kind: str, rng: random.Random) -> tuple[bytes, int | None]:
    rows = list(sample(case))
    if kind in ROW_KINDS or kind in JSON_ONLY_ROW_KINDS:
        return corrupt_rows(kind, rng, rows, fmt)
    if fmt == "parquet":
        return PARQUET_BYTE_KINDS[kind](rng, rows), None
    return TEXT_BYTE_KINDS[kind](rng, WRITERS[fmt](rows), fmt), None


# --- reading under a time limit, and judging the outcome ----------------------------------------

class ReaderHang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    # SIGALRM interrupts Python code; a loop inside pyarrow's C++ would be caught when it returns.
    def on_alarm(signum, frame):
        raise ReaderHang(f"no answer in {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rows_in_file(data: bytes, fmt: str, wraps_data: bool) -> int | None:
    """The rows a reader should account for (kept + dropped); None when the file has no row list."""
    if fmt == "jsonl":  # as data._raw_rows counts: non-blank lines, a BOM on the first one ignored
        lines = io.BytesIO(data).readlines()
        if lines and lines[0].startswith(b"\xef\xbb\xbf"):
            lines[0] = lines[0][3:]
        return sum(1 for line in lines if line.strip())
    if fmt == "json":
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            return None
        if wraps_data and isinstance(value, dict) and isinstance(value.get("data"), list):
            value = value["data"]
        return len(value) if isinstance(value, list) else None
    try:
        return pq.read_metadata(io.BytesIO(data)).num_rows
    except Exception:  # any failure means the footer cannot be read
        return None


def read_and_judge(case: Case, path: Path, skip_bad: bool, bad_row: int | None, n_rows: int | None,
                   what: str) -> list[dict] | RowError | SourceError:
    report = ReadReport(str(path))
    try:
        with time_limit(READ_SECONDS):
            rows = case.read(path, skip_bad=skip_bad, report=report)
    except (RowError, SourceError) as err:
        assert str(path) in str(err), f"{what}: error does not name the file: {err}"
        if isinstance(err, RowError) and err.row is not None:
            assert not skip_bad, f"{what}: skip_bad=True raised for one bad row instead of dropping it: {err}"
            assert f"row {err.row}" in str(err), f"{what}: {err}"
            if bad_row is not None:
                assert err.row == bad_row, f"{what}: error names row {err.row}, the fault is in row {bad_row}"
            # Only a row that is not JSON, or not an object, has no field to name.
            whole_row = err.reason == "malformed_json" or err.message.startswith("row is ")
            assert err.field or whole_row, f"{what}: error names no field: {err}"
        return err
    except Exception as err:  # the contract allows only RowError and SourceError: anything else is a bug
        raise AssertionError(f"{what}: skip_bad={skip_bad} raised {type(err).__name__}: {str(err)[:300]}") from err
    for row in rows:
        case.check_row(row)
    dropped = sum(report.dropped.values())
    assert report.kept == len(rows) and (skip_bad or not dropped), f"{what}: {report.as_dict()}"
    assert len(report.examples) == min(dropped, MAX_EXAMPLES)
    if n_rows is not None:
        assert report.kept + dropped == n_rows, \
            f"{what}: kept {report.kept} + dropped {dropped} != {n_rows} rows in the file"
    return rows


# --- tests ---------------------------------------------------------------------------------------

FORMATS = ("jsonl", "json", "parquet")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_sample_reads_whole(tmp_path, case, fmt):
    # The base of every corruption reads without a drop, so any error or drop below is the corruption's.
    path = tmp_path / f"rows.{fmt}"
    path.write_bytes(WRITERS[fmt](list(sample(case))))
    report = ReadReport(str(path))
    rows = CASES[case].read(path, skip_bad=True, report=report)
    assert len(rows) == report.kept == SLICE and not report.dropped


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt,kind", [(fmt, kind) for fmt in FORMATS for kind in KINDS[fmt]])
def test_corrupted_file(tmp_path, case, fmt, kind):
    for attempt in range(TRIES_PER_KIND):
        seed = f"{case}/{fmt}/{kind}/{attempt}"
        data, bad_row = corrupted_file(case, fmt, kind, random.Random(seed))
        path = tmp_path / f"{attempt}.{fmt}"
        path.write_bytes(data)
        n_rows = rows_in_file(data, fmt, CASES[case].wraps_data)
        strict = read_and_judge(CASES[case], path, False, bad_row, n_rows, seed)
        lenient = read_and_judge(CASES[case], path, True, bad_row, n_rows, seed)
        # The modes agree: a file read whole strictly loses nothing leniently; a bad row
        # raised strictly is dropped leniently, unless the file as a whole cannot be read.
        if isinstance(strict, list):
            assert isinstance(lenient, list) and len(lenient) == len(strict), seed
        elif isinstance(strict, RowError) and strict.row is not None and isinstance(lenient, list):
            assert len(lenient) < (n_rows or 0), seed


def test_corruption_count():
    per_case = TRIES_PER_KIND * sum(len(KINDS[fmt]) for fmt in FORMATS)
    assert per_case * len(CASES) == CORRUPTIONS_TRIED
