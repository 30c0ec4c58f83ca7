"""Readers: public dataset files (or hub datasets) into dalign's row schemas.

* ``read_dialogues``: ultrachat_200k-style rows -> dialogue rows ``{"id", "messages"}``.
* ``read_preferences``: ultrafeedback_binarized-style rows (message lists or plain strings,
  scores top-level or under ``metadata``) -> preference rows ``{"prompt_id", "prompt",
  "chosen", "rejected", "score_chosen", "score_rejected"}``, as ``dalign.binarize`` writes them.
* ``read_mt_bench``: FastChat question files -> ``{"question_id", "category", "turns", "reference"}``.
* ``read_alpaca_eval``: AlpacaEval files -> ``{"instruction", "output", "generator", "dataset"}``.

Bad rows are handled as in ``dalign.data.read_rows``: with ``skip_bad=False`` the first one
raises a RowError naming the file (or dataset), the 1-based row and the source's field; with
``skip_bad=True`` it is dropped and counted by reason in the ``ReadReport``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dalign.data import (_JSON_ERRORS, ReadReport, RowError, _check_conversation, _check_list, _check_row_is_dict,
                         _check_text, _raw_rows, validate_dialogue, validate_preference, validate_unpaired,
                         write_rows)

logger = logging.getLogger("dalign.readers")


class SourceError(ValueError):
    """A source that cannot be read at all (not a bad row): missing hub dataset, bad column mapping."""


class SourceConfig(BaseModel):
    # The same policy as dalign.config.Strict, declared here so config.py can embed a
    # SourceConfig in a recipe without a circular import.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    path: str | None = None
    """Local .jsonl, .parquet or .json file (a list of objects, or {"data": [...]}); give this or dataset."""
    dataset: str | None = None
    """Hugging Face hub dataset id (e.g. HuggingFaceH4/ultrafeedback_binarized); give this or path."""
    name: str | None = None
    """Config name of the hub dataset, when it has several."""
    split: str | None = None
    """Split of the hub dataset (e.g. train_prefs); required with dataset."""
    columns: dict[str, str] = Field(default_factory=dict)
    """dalign field name -> the source's column name, e.g. {prompt: instruction}."""
    offset: int = Field(0, ge=0)
    """Rows skipped at the start of the file or split, so a recipe can take one part and hold out another."""
    limit: int | None = Field(None, ge=1)
    """Most rows taken after offset; None takes the rest."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path (a local file) or dataset (a hub id)")
        if self.dataset is not None and not self.split:
            raise ValueError(f"dataset {self.dataset!r} needs a split (e.g. split: train)")
        if self.path is not None and (self.split or self.name):
            raise ValueError("split and name apply to a hub dataset, not to a local path")
        return self

    @property
    def label(self) -> str:
        """How errors name this source."""
        if self.path is not None:
            return self.path
        return f"{self.dataset}" + (f" ({self.name})" if self.name else "") + f" split {self.split}"


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    # data._raw_rows takes only a top-level list; exports of `datasets` and many repos wrap it in {"data": [...]}.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except _JSON_ERRORS as e:  # not only JSONDecodeError: bad UTF-8, deep nesting, huge integers
        raise RowError(f"not valid JSON: {e}", reason="malformed_json", path=path) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RowError("file holds neither a list of objects nor {\"data\": [...]}", reason="wrong_type", path=path)
    return enumerate(data, 1)


def _hub_rows(source: SourceConfig) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{source.label}: reading a hub dataset needs `pip install datasets==5.2.0`, "
                          "or give a local file as path") from None
    try:
        ds = datasets.load_dataset(source.dataset, source.name, split=source.split)
    except Exception as err:  # offline, unknown id, no network: all end the same way for the user
        offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise SourceError(
            f"cannot load dataset {source.label}{offline}: {type(err).__name__}: {err}. If it is not in the "
            f"local cache, download it first where there is network (datasets.load_dataset({source.dataset!r}, "
            f"{source.name!r}, split={source.split!r})) or give a local .jsonl/.parquet/.json file as path") from None
    end = len(ds) if source.limit is None else min(len(ds), source.offset + source.limit)
    return enumerate(ds.select(range(min(source.offset, end), end)), source.offset + 1)


def _source_rows(source: SourceConfig) -> Iterator[tuple[int, Any]]:
    """(1-based row number in the whole file or split, raw row) for the configured part."""
    if source.dataset is not None:
        return _hub_rows(source)
    path = Path(source.path)
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _raw_rows(path)
    # The part is cut by position before any validation, so offset/limit parts of one file
    # stay disjoint and fixed whatever rows turn out bad.
    stop = None if source.limit is None else source.offset + source.limit
    return itertools.islice(rows, source.offset, stop)


def _read(source: SourceConfig, convert: Callable[[dict], dict], fields: tuple[str, ...], *,
          skip_bad: bool, report: ReadReport | None) -> list[dict]:
    unknown = sorted(set(source.columns) - set(fields))
    if unknown:
        raise SourceError(f"{source.label}: columns maps unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    columns = source.columns
    report = report if report is not None else ReadReport(source.label)
    out: list[dict] = []
    for n, raw in _source_rows(source):
        try:
            if isinstance(raw, RowError):
                raise raw
            _check_row_is_dict(raw)
            row = {k: v for k, v in raw.items() if k not in columns.values()}
            for field, col in columns.items():
                if col not in raw:
                    raise RowError(f"missing column {col!r} (mapped to {field})", reason="missing_field", field=col)
                row[field] = raw[col]
            out.append(convert(row))
        except RowError as err:
            # Name the source's column, not dalign's field: that is what the user finds in the file.
            head, sep, rest = (err.field or "").partition(".")
            base, bracket, index = head.partition("[")
            if base in columns:
                err.field = columns[base] + bracket + index + sep + rest
            err.path, err.row = err.path or source.label, err.row or n
            if not skip_bad:
                raise
            report.drop(err)
    report.kept += len(out)
    if report.dropped:
        logger.info("%s: kept %d rows, dropped %s", source.label, report.kept, dict(report.dropped))
    return out


def _need(row: dict, key: str) -> Any:
    # A null counts as missing: that is how a parquet or hub row says a column has no value.
    if row.get(key) is None:
        raise RowError(f"missing '{key}'", reason="missing_field", field=key)
    return row[key]


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    value = _need(row, key)
    if not isinstance(value, str):
        raise RowError(f"{key} is {type(value).__name__}, expected str", reason="wrong_type", field=key)
    if not allow_empty and not value.strip():
        raise RowError(f"{key} is empty", reason="empty_content", field=key)
    _check_text(value, key)
    return value


def _strings(row: dict, key: str, *, allow_empty: bool) -> list[str]:
    value = _need(row, key)
    if not isinstance(value, list) or not value:
        raise RowError(f"{key} is {value!r:.40}, expected a non-empty list of str", field=key,
                       reason="empty_field" if value == [] else "wrong_type")
    return [_text({f"{key}[{i}]": text}, f"{key}[{i}]", allow_empty=allow_empty) for i, text in enumerate(value)]


def _row_id(row: dict, key: str, text: str) -> str:
    value = row.get(key)
    if value is None:  # the hub's ultrachat/ultrafeedback prompt_id is this same hash of the prompt
        # surrogatepass: a prompt text that is not checked (a dialogue's `prompt`) may hold a lone
        # surrogate, which plain UTF-8 refuses with UnicodeEncodeError; the hash needs only bytes.
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else _text(row, key)


def _prompt_id(row: dict, prompt: list[dict]) -> str:
    """The row's prompt_id, else the hash of a one-turn prompt's text (as the hub's) or of the whole prompt."""
    return _row_id(row, "prompt_id", prompt[-1]["content"] if len(prompt) == 1 else json.dumps(prompt))


def _dialogue(row: dict) -> dict:
    out = {"id": "-", "messages": _need(row, "messages")}
    validate_dialogue(out)  # dSFT trains on every assistant turn, so rows must end with one
    prompt = row.get("prompt")
    if not (isinstance(prompt, str) and prompt):
        prompt = next(m["content"] for m in out["messages"] if m["role"] == "user")
    out["id"] = _row_id(row, "prompt_id" if "prompt_id" in row else "id", prompt)
    return out


def _completion(row: dict, key: str, prompt: list) -> list:
    """A completion as assistant messages; hub rows repeat the prompt in front of it."""
    value = row.get(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(row, key)}]
    if isinstance(value, list) and value and isinstance(value[0], dict) and value[0].get("role") != "assistant":
        if value[:len(prompt)] != prompt:
            raise RowError(f"{key} does not start with the prompt", reason="prompt_mismatch", field=key)
        return value[len(prompt):]
    return value  # None or another shape: validate_preference names what is wrong


def _score(row: dict, key: str) -> float | None:
    """A score from the top level (the hub's rows) or from ``metadata`` (the sample files)."""
    value, field, meta = row.get(key), key, row.get("metadata")
    if value is None and isinstance(meta, dict):
        value, field = meta.get(key), f"metadata.{key}"
    if value is None:
        return None
    # abs(value) > max first: math.isfinite raises OverflowError for an int too large for a float.
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > sys.float_info.max
            or not math.isfinite(value)):
        raise RowError(f"{key} is {value!r}, expected a finite number", reason="wrong_type", field=field)
    return float(value)


def _preference(row: dict) -> dict:
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(row, "prompt")}]
    elif prompt is None:  # trl-lib style: no prompt column, the prompt is chosen's turns up to the last user one
        turns = chosen if isinstance(chosen, list) else []
        users = [i for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise RowError("missing 'prompt' (and chosen has no user turn)", reason="missing_field", field="prompt")
        prompt = chosen[:users[-1] + 1]
    out = {"prompt_id": None, "prompt": prompt}
    if isinstance(prompt, list):  # else validate_preference names the wrong type
        out.update({key: _completion(row, key, prompt) for key in ("chosen", "rejected") if key in row})
    validate_preference(out)
    if out["chosen"] == out["rejected"]:  # no preference signal: DPO's gradient on it is zero
        raise RowError("chosen and rejected are the same", reason="identical_pair", field="rejected")
    out["prompt_id"] = _prompt_id(row, prompt)
    out["score_chosen"], out["score_rejected"] = _score(row, "score_chosen"), _score(row, "score_rejected")
    return out


def _unpaired(row: dict) -> dict:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(row, "prompt")}]
    out = {"prompt_id": None, "prompt": prompt, "completion": row.get("completion"), "label": row.get("label")}
    if "label" not in row:
        out.pop("label")  # validate_unpaired tells a missing label from a wrong one
    if isinstance(prompt, list):  # else validate_unpaired names the wrong type
        out["completion"] = _completion(row, "completion", prompt)
    validate_unpaired(out)
    out["prompt_id"] = _prompt_id(row, prompt)
    out["score"] = _score(row, "score")
    return out


def _question(row: dict) -> dict:
    qid = _need(row, "question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise RowError(f"question_id is {qid!r}, expected int or str", reason="wrong_type", field="question_id")
    if isinstance(qid, str):  # a str id is returned as it is, so it must be writable text
        _check_text(qid, "question_id")
    # FastChat leaves a reference "" for a turn it has none for; a turn itself must not be empty.
    return {"question_id": qid, "category": _text(row, "category"),
            "turns": _strings(row, "turns", allow_empty=False),
            "reference": None if row.get("reference") is None else _strings(row, "reference", allow_empty=True)}


def _alpaca(row: dict) -> dict:
    # output may be empty: AlpacaEval's own text_davinci_003 baseline has 2 empty answers, and
    # dropping them would change the benchmark's 805 instructions.
    return {"instruction": _text(row, "instruction"), "output": _text(row, "output", allow_empty=True),
            "generator": _text(row, "generator"),
            "dataset": None if row.get("dataset") is None else _text(row, "dataset")}


def _prompt(row: dict) -> dict:
    key = "instruction" if row.get("prompt") is None and row.get("instruction") is not None else "prompt"
    prompt = row.get(key)  # `instruction`: UltraFeedback's and AlpacaEval's column
    if prompt is None:
        raise RowError("missing 'prompt' (or 'instruction')", reason="missing_field", field="prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(row, key)}]
    _check_conversation(_check_list({"prompt": prompt}, "prompt"), "prompt", ("user",))
    return {"prompt_id": _prompt_id(row, prompt),
            "prompt": prompt}


def read_prompts(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """AI-feedback prompts {prompt_id, prompt (messages ending with a user turn)} from rows with
    `prompt` (text or messages) or `instruction` (UltraFeedback, AlpacaEval)."""
    return _read(source, _prompt, ("prompt_id", "prompt", "instruction"), skip_bad=skip_bad, report=report)


def read_dialogues(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """ultrachat_200k-style rows (messages, optional prompt/prompt_id) as dialogue rows {id, messages}."""
    return _read(source, _dialogue, ("id", "prompt_id", "prompt", "messages"), skip_bad=skip_bad, report=report)


def read_preferences(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """ultrafeedback_binarized-style rows as preference rows {prompt_id, prompt, chosen, rejected, scores}.

    A pair whose chosen equals rejected is a bad row (``identical_pair``); scores are None when absent.
    """
    fields = ("prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "metadata")
    return _read(source, _preference, fields, skip_bad=skip_bad, report=report)


def read_unpaired(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """Unpaired rows, TRL's KTO format (prompt, completion, label: text or messages; a bool label,
    true for a desirable completion), as {prompt_id, prompt, completion, label, score}."""
    return _read(source, _unpaired, ("prompt_id", "prompt", "completion", "label", "score", "metadata"),
                 skip_bad=skip_bad, report=report)


def read_mt_bench(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """FastChat MT-Bench questions {question_id, category, turns, reference (None when absent)}."""
    return _read(source, _question, ("question_id", "category", "turns", "reference"), skip_bad=skip_bad,
                 report=report)


def read_alpaca_eval(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """AlpacaEval rows {instruction, output, generator, dataset (None when absent)}."""
    return _read(source, _alpaca, ("instruction", "output", "generator", "dataset"), skip_bad=skip_bad,
                 report=report)


def read_source(source: SourceConfig, reader: Callable, path: Path) -> dict:
    """Read a stage's input with `reader`, bad rows dropped and counted, and write the kept rows
    to `path`; the read's report (kept, dropped by reason, examples) is returned for the manifest."""
    report = ReadReport(source.label)
    write_rows(path, reader(source, skip_bad=True, report=report))
    return report.as_dict()
