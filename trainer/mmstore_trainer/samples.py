"""Sample files: JSONL (one :class:`Sample` a line) and Parquet, read strictly, written losslessly.

Rollout workers write them and the trainer reads them; every record goes through the strict
``Sample`` schema, so processed payloads (``pixel_values``, base64 pixels, ...) and unknown
fields are refused with the file and record named.

Parquet layout (one row a sample): the long per-token arrays are native list columns
(``token_ids`` int32, ``loss_mask`` bool, ``logprobs`` and ``advantages`` float64), so they stay
compact and columnar; ``pixel_digests`` is a list of strings; the small nested records whose keys
evolve with the schema (``descriptors``, ``image_spans``, ``meta``) are JSON strings. Per-sample
advantages go to the ``advantage`` column and per-token ones to ``advantages`` (the other is
null), so a one-token sample round-trips as what it was. Every field of ``Sample`` must have its
column: writing a sample with a field the layout lacks raises (Arrow would drop it silently).
Files written before a column existed read with that field's default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmstore_client.descriptor import Sample
from pydantic import ValidationError

if TYPE_CHECKING:
    from mmstore_client.render import Rendered

_JSON_COLUMNS = ("descriptors", "image_spans", "meta")
PARQUET_BATCH_ROWS = 256


class SampleFileError(ValueError):
    """A sample file that cannot be read: unknown suffix, bad JSON, or a record the schema refuses."""


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise SampleFileError(f"{path}: sample files are .jsonl or .parquet, got {suffix or 'no suffix'!r}")
    return suffix


def read_samples(path: str | Path) -> Iterator[Sample]:
    """The samples of one file, in order, each validated by the strict schema."""
    path = Path(path)
    if _suffix(path) == ".jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def write_samples(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write ``samples`` to ``path`` (format by suffix), atomically; return how many."""
    path = Path(path)
    suffix = _suffix(path)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = list(samples)
    try:
        if suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for sample in rows:
                    f.write(sample.model_dump_json() + "\n")
        else:
            _write_parquet(tmp, rows)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)


def sample_from_rendered(
    rendered: Rendered,
    *,
    sample_id: str,
    advantages: float | Sequence[float],
    logprobs: Sequence[float] | None = None,
    reward: float | None = None,
    meta: dict[str, Any] | None = None,
) -> Sample:
    """The training sample of a rendered conversation: its ids, descriptors and spans, the
    assistant tokens as the loss mask, and ``logprobs`` (0.0 everywhere when not given)."""
    n = len(rendered.token_ids)
    return Sample(
        sample_id=sample_id,
        token_ids=list(rendered.token_ids),
        loss_mask=list(rendered.assistant_mask),
        advantages=advantages if isinstance(advantages, int | float) else list(advantages),
        logprobs=list(logprobs) if logprobs is not None else [0.0] * n,
        descriptors=list(rendered.descriptors),
        image_spans=list(rendered.image_spans),
        reward=reward,
        meta=meta or {},
    )


def _read_jsonl(path: Path) -> Iterator[Sample]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Sample.model_validate_json(line)
            except ValidationError as exc:
                raise SampleFileError(f"{path}:{lineno}: invalid sample: {exc}") from exc


def _parquet_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("version", pa.int32()),
            ("sample_id", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("loss_mask", pa.list_(pa.bool_())),
            ("advantages", pa.list_(pa.float64())),
            ("advantage", pa.float64()),
            ("logprobs", pa.list_(pa.float64())),
            ("descriptors", pa.string()),
            ("image_spans", pa.string()),
            ("reward", pa.float64()),
            ("pixel_digests", pa.list_(pa.string())),
            ("meta", pa.string()),
        ]
    )


def _to_row(sample: Sample, columns: set[str]) -> dict[str, Any]:
    row = sample.model_dump(mode="json")
    unknown = row.keys() - columns
    if unknown:
        raise SampleFileError(
            f"sample {sample.sample_id!r}: field(s) {sorted(unknown)} have no Parquet column; add them "
            "to _parquet_schema in mmstore_trainer/samples.py (or write .jsonl)"
        )
    per_token = isinstance(row["advantages"], list)
    row["advantage"] = None if per_token else row["advantages"]
    row["advantages"] = row["advantages"] if per_token else None
    for key in _JSON_COLUMNS:
        row[key] = json.dumps(row[key], separators=(",", ":"))
    return row


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    if "advantage" in row:
        scalar = row.pop("advantage")
        if row.get("advantages") is None:
            row["advantages"] = scalar
    return row


def _write_parquet(path: Path, samples: list[Sample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    columns = set(schema.names)
    table = pa.Table.from_pylist([_to_row(s, columns) for s in samples], schema=schema)
    pq.write_table(table, path)


def _read_parquet(path: Path) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            try:
                yield Sample.model_validate(_from_row(row))
            except (ValidationError, ValueError) as exc:
                raise SampleFileError(f"{path}: row {index}: invalid sample: {exc}") from exc
            index += 1
