"""Resumable generation in parts: each chunk of rows is written whole to its own file.

A stage that generates rows (dialogues, completions, ratings) hands each chunk to
`in_parts`; a killed run finds the parts already written, loads them instead of making
them again, and makes the missing ones. No row is lost or written twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from dalign.console import Progress
from dalign.data import read_rows, write_rows
from dalign.parallel import barrier, rank_and_world


def in_parts(n_items: int, chunk_size: int, folder: Path,
             make_chunk: Callable[[int, int], tuple[list[dict], Counter]]) -> tuple[list[dict], Counter]:
    """Rows of every chunk [start, end) in order, and drops counted by reason.

    `make_chunk(start, end)` makes one chunk's rows from those rows alone, so a chunk comes out
    the same whoever makes it. Under a multi-process launch chunk k is made by rank
    k % processes; after a barrier every process reads every part. A relaunch with any number
    of processes makes only the parts still missing."""
    rank, world = rank_and_world()
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    files = [(parts / f"part-{k:05d}.jsonl", parts / f"part-{k:05d}.stats.json", start)
             for k, start in enumerate(range(0, n_items, chunk_size))]
    mine = [(part, stats, start) for k, (part, stats, start) in enumerate(files) if k % world == rank]
    size = lambda start: min(n_items, start + chunk_size) - start  # noqa: E731
    todo = [(part, stats, start) for part, stats, start in mine if not (part.exists() and stats.exists())]
    total = sum(size(start) for *_, start in mine)  # the bar counts this process's share of the items
    with Progress(folder.name, total, "rows", initial=total - sum(size(start) for *_, start in todo)) as bar:
        for part, stats, start in todo:  # the part file, written last, marks a chunk done
            chunk_rows, chunk_dropped = make_chunk(start, start + size(start))
            stats.write_text(json.dumps(chunk_dropped))
            write_rows(part, chunk_rows)
            bar.update(size(start))
    barrier()
    rows, dropped = [], Counter()
    for part, stats, _ in files:
        rows += read_rows(part)
        dropped.update(json.loads(stats.read_text()))
    return rows, dropped
