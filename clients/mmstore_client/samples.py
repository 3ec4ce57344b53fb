"""Training samples: the schema, the one builder, and the sample files (JSONL and Parquet).

A :class:`Sample` is one trajectory as the trainer trains on it: token ids with every image's
placeholder run expanded, the loss mask, advantages, inference logprobs, the images' descriptors
and spans. It is part of the contract because three parties make or read it and must agree on
every field: rollout workers and :mod:`.stock_vllm` build samples, the trainer reads them. They all
build through :func:`sample_from_rendered`, so a sample's fields are derived one way (ids,
descriptors, spans and loss mask from a :class:`~mmstore_client.render.Rendered` conversation).

Sample files are read strictly and written losslessly: every record goes through the strict
schema, so processed payloads (``pixel_values``, base64 pixels, ...) and unknown fields are
refused with the file and record named. JSONL is one ``Sample`` a line.

Parquet layout (one row a sample): the long per-token arrays are native list columns
(``token_ids`` int32, ``loss_mask`` bool, ``logprobs`` and ``advantages`` float64), so they stay
compact and columnar; ``pixel_digests`` is a list of strings; the small nested records whose keys
evolve with the schema (``descriptors``, ``image_spans``, ``meta``) are JSON strings. Per-sample
advantages go to the ``advantage`` column and per-token ones to ``advantages`` (the other is
null), so a one-token sample round-trips as what it was. Every field of ``Sample`` must have its
column: writing a sample with a field the layout lacks raises (Arrow would drop it silently).
Files written before a column existed read with that field's default. Parquet needs pyarrow, the
``parquet`` extra (``mmstore-client[parquet]``); it is imported only when a Parquet file is read
or written, so JSONL and the schema stay light.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from .descriptor import Descriptor, Digest, ImageSpan, LayoutScalar, TokenId, _Strict

if TYPE_CHECKING:
    from .render import Rendered

SAMPLE_VERSION = 1
_JSON_COLUMNS = ("descriptors", "image_spans", "meta")
PARQUET_BATCH_ROWS = 256


class Sample(_Strict):
    """A training sample as rollout workers write it (JSONL / Parquet) and the trainer reads it.

    ``descriptors[i]`` is the i-th image in order of appearance; ``image_spans[i]`` is where its
    placeholder run sits in ``token_ids``. ``loss_mask`` marks the tokens to train on (the
    assistant's); ``advantages`` is per token (same length) or one per sample;
    ``logprobs`` holds the inference logprobs of the tokens (0.0 where not sampled).
    """

    version: Literal[1] = SAMPLE_VERSION
    sample_id: str
    token_ids: list[TokenId]
    loss_mask: list[bool]
    advantages: list[float] | float
    logprobs: list[float]
    descriptors: list[Descriptor] = Field(default_factory=list)
    image_spans: list[ImageSpan] = Field(default_factory=list)
    reward: float | None = None
    pixel_digests: list[Digest] | None = Field(
        None, description="per image, decode.pixel_digest of the pixels inference sampled from"
    )
    meta: dict[str, LayoutScalar] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Sample:
        n = len(self.token_ids)
        for name in ("loss_mask", "logprobs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} tokens")
        if isinstance(self.advantages, list) and len(self.advantages) != n:
            raise ValueError(f"advantages has {len(self.advantages)} entries for {n} tokens")
        if self.pixel_digests is not None and len(self.pixel_digests) != len(self.descriptors):
            raise ValueError(
                f"{len(self.pixel_digests)} pixel digests for {len(self.descriptors)} descriptors"
            )
        if len(self.image_spans) != len(self.descriptors):
            raise ValueError(f"{len(self.image_spans)} image spans for {len(self.descriptors)} descriptors")
        end = 0
        for i, (span, desc) in enumerate(zip(self.image_spans, self.descriptors, strict=True)):
            if span.length != desc.num_tokens:
                raise ValueError(
                    f"image {i}: span of {span.length} tokens, descriptor says {desc.num_tokens}"
                )
            if span.start < end or span.start + span.length > n:
                raise ValueError(
                    f"image {i}: span {span.start}+{span.length} overlaps or leaves the sequence"
                )
            end = span.start + span.length
            if any(self.loss_mask[span.start : end]):
                raise ValueError(f"image {i}: loss_mask is set on image placeholder tokens")
        return self


def sample_from_rendered(
    rendered: Rendered,
    *,
    sample_id: str,
    advantages: float | Sequence[float],
    logprobs: Sequence[float] | None = None,
    reward: float | None = None,
    pixel_digests: Sequence[str] | None = None,
    meta: dict[str, LayoutScalar] | None = None,
) -> Sample:
    """The training sample of a rendered conversation (prompt and sampled completions, e.g.
    ``prompt.extend(completion_ids, assistant=True)``): its ids, descriptors and spans, the
    assistant tokens as the loss mask, and ``logprobs`` per token (0.0 everywhere when not given).
    ``pixel_digests``: per image, what inference reported it sampled from (the trainer's pixel
    check). A conversation rendered without its mask (``render(..., assistant_mask=False)``) has
    nothing to train on: ``ValueError``."""
    if rendered.assistant_mask is None:
        raise ValueError(
            f"sample {sample_id!r}: rendered without its assistant mask (render(..., "
            "assistant_mask=False)), so no token is marked for training; render it with the mask"
        )
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
        pixel_digests=list(pixel_digests) if pixel_digests is not None else None,
        meta=meta or {},
    )


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


def _pyarrow():
    """``(pyarrow, pyarrow.parquet)``, or an error naming the extra that installs them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "Parquet sample files need pyarrow: install mmstore-client[parquet] (or use .jsonl)",
            name=exc.name,
        ) from exc
    return pa, pq


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
    pa, _ = _pyarrow()
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
            "to _parquet_schema in mmstore_client/samples.py (or write .jsonl)"
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
    pa, pq = _pyarrow()
    schema = _parquet_schema()
    columns = set(schema.names)
    table = pa.Table.from_pylist([_to_row(s, columns) for s in samples], schema=schema)
    pq.write_table(table, path)


def _read_parquet(path: Path) -> Iterator[Sample]:
    _, pq = _pyarrow()
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            try:
                yield Sample.model_validate(_from_row(row))
            except (ValidationError, ValueError) as exc:
                raise SampleFileError(f"{path}: row {index}: invalid sample: {exc}") from exc
            index += 1
