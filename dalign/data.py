"""Row schemas and file I/O for dalign datasets.

Rows are plain dicts stored as JSON lines (``.jsonl``), Parquet (``.parquet``)
or a JSON list (``.json``), so Hugging Face ``datasets`` and TRL read them as-is.

Dialogue row (dSFT data, generated dialogues, evaluation prompts)::

    {"id": "abc", "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], ...}

* ``id`` is a non-empty string; ``messages`` a non-empty list.
* Each message has exactly the string keys ``role`` and ``content``; ``role`` is
  one of ``ROLES``; ``content`` is non-empty after stripping whitespace.
* A system message may only come first; after it the turns alternate
  user, assistant, user, ... starting with user.
* Training rows end with an assistant turn (``require_final_assistant=True``);
  evaluation prompts may end with a user turn.

Preference row (DPO data)::

    {"prompt": [messages ending in a user turn], "chosen": [assistant messages],
     "rejected": [assistant messages], ...}

Extra top-level keys are allowed and kept in both schemas. Field paths in errors
use 0-based list indices (``messages[1].role`` is the second message); row
numbers are 1-based (the line number in a ``.jsonl`` file, blank lines counted).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROLES = ("system", "user", "assistant")
MAX_EXAMPLES = 5  # error messages kept in a ReadReport, and logged

logger = logging.getLogger("dalign.data")


class RowError(ValueError):
    """A bad row, located by file path, 1-based row number and dotted field path.

    ``reason`` is a short snake_case key (``unknown_role``, ``empty_content``,
    ``missing_field``, ``wrong_type``, ``extra_field``, ``empty_field``,
    ``bad_order``, ``bad_final_turn``, ``malformed_json``, ``malformed_parquet``, ``bad_text``)
    used to count drops.
    """

    def __init__(self, message: str, *, reason: str = "invalid_row", field: str | None = None,
                 path: str | os.PathLike | None = None, row: int | None = None) -> None:
        super().__init__(message)  # args=(message,) keeps the default pickling working
        self.message = message
        self.reason = reason
        self.field = field
        self.path = None if path is None else str(path)
        self.row = row

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field:
            where.append(f"field {self.field}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_message(msg: Any, field: str) -> str:
    """Check one message's shape and return its role."""
    if not isinstance(msg, dict):
        raise RowError(f"message is {_type_name(msg)}, expected an object", reason="wrong_type", field=field)
    for key in ("role", "content"):
        if key not in msg:
            raise RowError(f"missing '{key}'", reason="missing_field", field=f"{field}.{key}")
    extra = sorted(set(msg) - {"role", "content"}, key=str)
    if extra:
        raise RowError(f"unexpected key '{extra[0]}' (a message has only role and content)",
                       reason="extra_field", field=f"{field}.{extra[0]}")
    role, content = msg["role"], msg["content"]
    if not isinstance(role, str):
        raise RowError(f"role is {_type_name(role)}, expected str", reason="wrong_type", field=f"{field}.role")
    if role not in ROLES:
        raise RowError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
                       reason="unknown_role", field=f"{field}.role")
    if not isinstance(content, str):
        raise RowError(f"content is {_type_name(content)}, expected str", reason="wrong_type",
                       field=f"{field}.content")
    if not content.strip():
        raise RowError("content is empty", reason="empty_content", field=f"{field}.content")
    _check_text(content, f"{field}.content")
    return role


def _check_text(text: str, field: str) -> None:
    """Raise RowError if ``text`` cannot be written back as UTF-8."""
    # A JSON escape like "\ud800" decodes to a lone surrogate: the row reads, but writing it
    # (write_rows) or hashing it (readers' ids) raised UnicodeEncodeError. Found by test_fuzz_readers.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"text holds a lone surrogate {text[e.start]!r} at {e.start}, which is not Unicode",
                       reason="bad_text", field=field) from None


def _check_list(row: dict, key: str) -> list:
    if key not in row:
        raise RowError(f"missing '{key}'", reason="missing_field", field=key)
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"{key} is {_type_name(value)}, expected a list", reason="wrong_type", field=key)
    if not value:
        raise RowError(f"{key} is empty", reason="empty_field", field=key)
    return value


def _check_conversation(messages: list, field: str, final_roles: tuple[str, ...]) -> None:
    """Check an optional leading system message, then user/assistant alternation."""
    start = 0
    for i, msg in enumerate(messages):
        role = _check_message(msg, f"{field}[{i}]")
        if role == "system":
            if i != 0:
                raise RowError("a system message may only come first", reason="bad_order",
                               field=f"{field}[{i}].role")
            start = 1
            continue
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise RowError(f"expected a {expected} turn, got {role!r} (turns alternate user, assistant, ...)",
                           reason="bad_order", field=f"{field}[{i}].role")
    if start == len(messages):
        raise RowError("only a system message, no user turn", reason="bad_order", field=field)
    last = len(messages) - 1
    if messages[last]["role"] not in final_roles:
        raise RowError(f"last turn is {messages[last]['role']!r}, expected {' or '.join(final_roles)}",
                       reason="bad_final_turn", field=f"{field}[{last}].role")


def _check_row_is_dict(row: Any) -> None:
    if not isinstance(row, dict):
        raise RowError(f"row is {_type_name(row)}, expected a JSON object", reason="wrong_type")


def validate_dialogue(row: dict, *, require_final_assistant: bool = True) -> None:
    """Raise RowError (with field and reason; path/row are None) if ``row`` is not a valid dialogue."""
    _check_row_is_dict(row)
    if "id" not in row:
        raise RowError("missing 'id'", reason="missing_field", field="id")
    if not isinstance(row["id"], str):
        raise RowError(f"id is {_type_name(row['id'])}, expected str", reason="wrong_type", field="id")
    if not row["id"].strip():
        raise RowError("id is empty", reason="empty_field", field="id")
    messages = _check_list(row, "messages")
    finals = ("assistant",) if require_final_assistant else ("user", "assistant")
    _check_conversation(messages, "messages", finals)


def validate_preference(row: dict) -> None:
    """Raise RowError if ``row`` is not a valid preference row (prompt/chosen/rejected)."""
    _check_row_is_dict(row)
    _check_conversation(_check_list(row, "prompt"), "prompt", ("user",))
    for key in ("chosen", "rejected"):
        for i, msg in enumerate(_check_list(row, key)):
            role = _check_message(msg, f"{key}[{i}]")
            if role != "assistant":
                raise RowError(f"{key} holds only assistant messages, got {role!r}", reason="bad_order",
                               field=f"{key}[{i}].role")


def validate_unpaired(row: dict) -> None:
    """Raise RowError if ``row`` is not a valid unpaired row (prompt/completion/label, TRL's KTO format)."""
    _check_row_is_dict(row)
    _check_conversation(_check_list(row, "prompt"), "prompt", ("user",))
    for i, msg in enumerate(_check_list(row, "completion")):
        if (role := _check_message(msg, f"completion[{i}]")) != "assistant":
            raise RowError(f"completion holds only assistant messages, got {role!r}", reason="bad_order",
                           field=f"completion[{i}].role")
    if not isinstance(row.get("label"), bool):
        raise RowError(f"label is {_type_name(row.get('label'))}, expected true or false", field="label",
                       reason="missing_field" if "label" not in row else "wrong_type")


@dataclasses.dataclass
class ReadReport:
    """What a read kept and dropped, for manifests and logs."""

    path: str
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def drop(self, err: "RowError") -> None:
        """Count a bad row by reason; the first few are kept as examples and logged."""
        self.dropped[err.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(err))
            logger.warning("dropping bad row: %s", err)

    def as_dict(self) -> dict:
        return {"path": self.path, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "examples": list(self.examples)}


# What json.loads raises for bytes that are no JSON document, besides JSONDecodeError (found by
# test_fuzz_readers): UnicodeDecodeError (bad UTF-8), ValueError (an integer of over 4300 digits)
# and RecursionError (nesting deeper than about 1000).
_JSON_ERRORS = (ValueError, RecursionError)


def _parquet_batches(path: Path) -> Iterator[Any]:
    """The file's record batches; a file pyarrow cannot read (truncated, damaged, not Parquet)
    raises RowError naming it instead of pyarrow's ArrowInvalid or OSError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
    except FileNotFoundError:
        raise  # as for the other formats
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise RowError(f"not a readable Parquet file: {type(e).__name__}: {e}", reason="malformed_parquet",
                       path=path) from e


def _parquet_rows(batch: Any) -> list[Any]:
    """A batch's rows as dicts; pyarrow does not check UTF-8 on read, so a string column may hold
    bytes that fail in to_pylist: then that row is a RowError naming the column, the others are kept."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    rows = []
    for i in range(batch.num_rows):
        row = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                row[name] = column[i].as_py()
            except UnicodeDecodeError as e:
                row = RowError(f"not valid UTF-8: {e}", reason="bad_text", field=name)
                break
        rows.append(row)
    return rows


def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based row number, decoded row or RowError) without validating."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        # Binary mode so one line of bad UTF-8 is one bad row, not a failed file.
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    yield n, json.loads(raw.decode("utf-8"))
                except _JSON_ERRORS as e:
                    yield n, RowError(f"not valid JSON: {e}", reason="malformed_json")
    elif suffix == ".parquet":
        n = 0
        for batch in _parquet_batches(path):
            for row in _parquet_rows(batch):
                n += 1
                yield n, row
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except _JSON_ERRORS as e:
                raise RowError(f"not valid JSON: {e}", reason="malformed_json", path=path) from e
        if not isinstance(data, list):
            raise RowError(f"file holds {_type_name(data)}, expected a list of objects", reason="wrong_type",
                           path=path)
        yield from enumerate(data, 1)
    else:
        raise ValueError(f"{path}: unsupported suffix {suffix!r} (expected .jsonl, .parquet or .json)")


def iter_rows(path: str | os.PathLike, *, validate: Callable[[dict], None] | None = None,
              skip_bad: bool = False, report: ReadReport | None = None) -> Iterator[dict]:
    """Stream rows from ``path``; see ``read_rows``."""
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    for n, row in _raw_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            _check_row_is_dict(row)
            if validate is not None:
                validate(row)
        except RowError as err:
            if err.path is None:
                err.path = str(path)
            if err.row is None:
                err.row = n
            if not skip_bad:
                raise
            report.drop(err)
            continue
        report.kept += 1
        yield row
    if report.dropped:
        logger.info("%s: kept %d rows, dropped %s", path, report.kept, dict(report.dropped))


def read_rows(path: str | os.PathLike, *, validate: Callable[[dict], None] | None = None,
              skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """Read all rows of a .jsonl, .parquet or .json file.

    ``validate`` is called on each row and raises RowError for a bad one (e.g.
    ``functools.partial(validate_dialogue, require_final_assistant=False)``).
    With ``skip_bad=False`` the first bad row raises, with path and row filled
    in; with ``skip_bad=True`` bad rows are dropped and counted in ``report``.
    """
    return list(iter_rows(path, validate=validate, skip_bad=skip_bad, report=report))


def _json_line(row: dict) -> str:
    # allow_nan=False: NaN/Infinity are not JSON and other readers (pyarrow, datasets) reject them.
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | Path, value: Any, **dumps: Any) -> None:
    """Write one JSON document atomically (a uniquely named temp file renamed over ``path``),
    so a reader never sees half a file, whatever else writes beside it; ``dumps`` go to json.dumps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, **dumps))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write ``rows`` atomically to a .jsonl or .parquet file (by suffix); return the count.

    A temp file in the same folder is renamed over ``path``, so readers never see
    a half-written file and a crash leaves any previous version intact.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unsupported suffix {suffix!r} (expected .jsonl or .parquet)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if suffix == ".jsonl":
            count = 0
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(_json_line(row))
                    count += 1
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            os.close(fd)
            data = list(rows)
            # Columns from the union of keys: from_pylist would keep only the first row's keys.
            keys = list(dict.fromkeys(k for row in data for k in row))
            pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in data] for k in keys}), tmp)
            count = len(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Append ``rows`` to a .jsonl file, flushed and fsynced; return the count.

    For resumable stages: what returned is on disk. If an earlier crash left a
    partial last line, a newline is added first so it stays one malformed row
    (droppable with ``skip_bad``) instead of corrupting the first new row.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: append_rows needs a .jsonl file")
    text = "".join(_json_line(row) for row in rows)  # serialize first: a bad row writes nothing
    count = text.count("\n")  # json.dumps escapes newlines inside strings
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    return count
