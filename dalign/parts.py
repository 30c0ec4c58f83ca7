"""Resumable generation in parts: each chunk of rows is written whole to its own file.

A stage that generates rows (dialogues, completions, ratings) hands each chunk to
`in_parts`; a killed run finds the parts already written, loads them instead of making
them again, and continues at the first missing one. No row is lost or written twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from dalign.data import read_rows, write_rows


def in_parts(n_items: int, chunk_size: int, folder: Path, make_chunk: Callable[[int, int], tuple[list[dict], Counter]],
             on_rows: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], Counter]:
    """Rows of every chunk [start, end) in order, and drops counted by reason.

    `make_chunk(start, end)` makes one chunk's rows; `on_rows` sees every chunk's rows in
    order, loaded or made, so that state carried across chunks (dedup sets) is rebuilt
    the same on a resume."""
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    rows, dropped = [], Counter()
    for k, start in enumerate(range(0, n_items, chunk_size)):
        part, stats = parts / f"part-{k:05d}.jsonl", parts / f"part-{k:05d}.stats.json"
        if part.exists() and stats.exists():  # the part file is written last: it marks the chunk done
            chunk_rows, chunk_dropped = read_rows(part), Counter(json.loads(stats.read_text()))
        else:
            chunk_rows, chunk_dropped = make_chunk(start, min(n_items, start + chunk_size))
            stats.write_text(json.dumps(chunk_dropped))
            write_rows(part, chunk_rows)
        if on_rows is not None:
            on_rows(chunk_rows)
        rows += chunk_rows
        dropped.update(chunk_dropped)
    return rows, dropped
