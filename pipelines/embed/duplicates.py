"""What ``thinkfast embed`` does with keys the corpus holds more than once (``--on-duplicate``).

Decided on the driver before any work, from the key column alone
(:func:`thinkfast.data.reader.find_duplicate_keys`): ``error`` refuses with one line;
``first`` / ``reject`` make a :class:`DuplicatePlan` that the read stage of both streams
applies, so that no stage ever sees a key twice and no output holds one twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinkfast_pipelines.embed.config import EmbedConfig, EmbedError

if TYPE_CHECKING:
    import pyarrow as pa

    from thinkfast.data.reader import CorpusInfo, DuplicateKeys

logger = logging.getLogger(__name__)


DUPLICATE_REASON = "duplicate_key"


@dataclass(frozen=True)
class DuplicatePlan:
    """What ``--on-duplicate first|reject`` does with the repeated keys, decided on the
    driver before any work: their rows are left out of the read streams (``drop``, by key:
    a stateless stage can tell a key, not which occurrence it holds), the copy that
    ``first`` keeps is read back by position and joins the streams (``keep``), and every
    other occurrence becomes a ``rejected/`` row written by the driver (``rejects``)."""

    drop: frozenset[str]
    keep: tuple[tuple[str, int], ...]  # (file URI, row in file) of each kept copy
    rejects: "pa.Table"  # REJECT_SCHEMA rows, stage "read", reason "duplicate_key"


def check_duplicates(corpus: CorpusInfo, config: EmbedConfig) -> DuplicatePlan | None:
    """Scan the corpus's key column; refuse (``error``) or plan (``first``/``reject``).

    Runs before Ray starts and before anything under ``--out`` is deleted. With
    ``--limit`` the whole corpus is scanned (the rows a limited read takes are not fixed
    by file order), so ``error`` may refuse a repeat beyond the limit, and ``first`` /
    ``reject`` are refused: they cannot say which of the limited rows are the extras."""
    from thinkfast.data.decode import Reject, rejects_table
    from thinkfast.data.reader import find_duplicate_keys

    found: DuplicateKeys = find_duplicate_keys(corpus, config.s3_endpoint)
    if not found:
        return None
    if config.on_duplicate == "error":
        raise EmbedError(f"{found.describe()}; keys must be unique: fix the corpus, or pass --on-duplicate first "
                         "(keep the first occurrence) or --on-duplicate reject (reject every row of such a key)")
    if config.limit is not None:
        raise EmbedError(f"--on-duplicate {config.on_duplicate} cannot be combined with --limit "
                         f"({found.describe(max_keys=3)})")
    rejects = []
    keep = []
    for key, places in found.occurrences.items():
        where = ", ".join(f"{f.rsplit('/', 1)[-1]} row {r}" for f, r in places[:5])
        if config.on_duplicate == "first":
            kept_file, kept_row = places[0]
            keep.append(places[0])
            for f, r in places[1:]:
                rejects.append(Reject(key, "read", DUPLICATE_REASON,
                                      f"{f.rsplit('/', 1)[-1]} row {r} repeats the key; kept the first occurrence "
                                      f"({kept_file.rsplit('/', 1)[-1]} row {kept_row})"))
        else:
            for f, r in places:
                rejects.append(Reject(key, "read", DUPLICATE_REASON,
                                      f"{f.rsplit('/', 1)[-1]} row {r}: the key occurs {len(places)}x ({where}); "
                                      "--on-duplicate reject"))
    logger.warning("--on-duplicate %s: %s; %d row(s) go to rejected/", config.on_duplicate, found.describe(),
                   len(rejects))
    return DuplicatePlan(drop=frozenset(found.occurrences), keep=tuple(keep), rejects=rejects_table(rejects))


def kept_rows(plan: DuplicatePlan, columns: list[str], s3_endpoint: str | None) -> "pa.Table":
    """The kept copies (``first``) of the repeated keys, ``columns`` only, read by position."""
    import pyarrow as pa

    from thinkfast.data.reader import read_rows

    by_file: dict[str, list[int]] = {}
    for f, r in plan.keep:
        by_file.setdefault(f, []).append(r)
    tables = [read_rows(f, rows, columns, s3_endpoint) for f, rows in by_file.items()]
    return pa.concat_tables(tables, promote_options="permissive")
