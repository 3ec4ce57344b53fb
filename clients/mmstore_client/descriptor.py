"""Descriptors: the small, strict records that cross process boundaries.

A :class:`Descriptor` is the raw multimodal item: which bytes (digest), what they are (mime,
oriented width/height), and how the model family lays them out (family, layout config and its
fingerprint, grid, placeholder token count). About 200 bytes of JSON; never pixels.

Processed payloads are refused anywhere in a descriptor, a message list or a sample
(:mod:`.samples`), with an error naming the path, so that nobody quietly ships 20 MB tensors
through the rollout path. They are recognised by what they are, never by the alphabet of free
text (a tool's listing of numbers or hex digests is text): keys that only hold processed data
(``pixel_values``, ``image_embeds`` and kin), arrays and tensors, arrays of arrays of numbers (a
tensor written out as JSON), inline ``data:`` URIs, base64 in the fields that hold images, and
base64 anywhere (a whole string, or a run of 64+ characters inside text or a JSON string) that
decodes to an image file, by its format's signature.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .digest import REF_PREFIX, is_digest

DESCRIPTOR_VERSION = 1

# keys that only ever hold processed image data
PROCESSED_KEYS = frozenset(
    {
        "pixel_values",
        "pixel_values_videos",
        "image_embeds",
        "image_features",
        "vision_embeds",
        "image_tensor",
        "image_tensors",
        "pixel_attention_mask",
        "patch_embeds",
        "mm_embeds",
    }
)
# keys whose value is an image (a string, or ``{"url": ...}``): an mmstore ref, a URL or, before
# offload, a data URI; never bare base64 (chat parts, the Responses API, HF/vLLM-style parts)
IMAGE_KEYS = frozenset({"image_url", "image", "input_image", "image_base64", "b64_json"})
# arrays of arrays of numbers with this many numbers or more are tensors written out as JSON
# (layout configs hold a few small ones, e.g. LLaVA's grid pinpoints)
NESTED_NUMBERS_LIMIT = 1024
_PLAIN_NUMBERS = {int, float, bool}
_DATA_URI = re.compile(r"^data:[^,]{0,100};base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_BASE64_IN_IMAGE_FIELD = 64  # characters: shorter strings are names or paths, not image files
# where base64 can start, and long enough (48 bytes) to be an image file rather than a word or path
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{64,}")
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


def _image_format(head: bytes) -> str | None:
    """The image format whose file starts with ``head`` (18 bytes suffice), by its signature."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "BMP"
    return None


def _base64_bytes(text: str) -> int | None:
    """How many bytes ``text`` is the base64 of (whitespace ignored, as in wrapped base64), or None."""
    compact = _WHITESPACE.sub("", text)
    try:
        return len(base64.b64decode(compact, validate=True)) if compact else None
    except (binascii.Error, ValueError):
        return None


def _base64_image(text: str) -> str | None:
    """The format of an image file written as base64 inside ``text`` (whole, or a run of it, as in
    prose or a JSON string), by the signature its first bytes decode to; None if there is none."""
    for run in _BASE64_RUN.finditer(text):
        try:
            fmt = _image_format(base64.b64decode(run.group()[:24], validate=True))  # 18 bytes
        except (binascii.Error, ValueError):
            continue
        if fmt:
            return fmt
    return None


def _nested_numbers(obj: list | tuple) -> int:
    """How many numbers an array of arrays of numbers holds; 0 for anything else."""
    if not obj or not all(isinstance(x, list | tuple) for x in obj):
        return 0
    total = 0
    for row in obj:
        if row and set(map(type, row)) <= _PLAIN_NUMBERS:
            total += len(row)
        else:
            inner = _nested_numbers(row)
            if not inner:
                return 0
            total += inner
    return total


class ProcessedPayloadError(ValueError):
    """A processed image payload where only refs and descriptors may travel."""

    code = "processed_payload"

    def __init__(self, path: str, what: str) -> None:
        super().__init__(
            f"processed image payload at {path}: {what}; send mmstore refs and descriptors instead"
        )
        self.path = path


def reject_processed(
    obj: Any, path: str = "$", *, allow_data_uris: bool = False, _image: bool = False
) -> None:
    """Raise :class:`ProcessedPayloadError` for any processed payload inside ``obj`` (recursive).

    ``allow_data_uris`` admits ``data:image/...;base64,`` URLs (the input of offload, before
    they are replaced by refs); everywhere downstream of offload they are refused.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in PROCESSED_KEYS:
                raise ProcessedPayloadError(f"{path}.{key}", f"key {key!r}")
            if value is None or type(value) in _PLAIN_NUMBERS:  # a leaf with nothing to check
                continue
            image = key in IMAGE_KEYS or (_image and key == "url")
            reject_processed(value, f"{path}.{key}", allow_data_uris=allow_data_uris, _image=image)
    elif isinstance(obj, list | tuple):
        if obj and set(map(type, obj)) <= _PLAIN_NUMBERS:  # token ids, masks, logprobs: fast path
            return
        numbers = _nested_numbers(obj)
        if numbers >= NESTED_NUMBERS_LIMIT:
            raise ProcessedPayloadError(path, f"nested array of {numbers} numbers (a tensor as JSON)")
        for i, value in enumerate(obj):
            reject_processed(value, f"{path}[{i}]", allow_data_uris=allow_data_uris)
    elif isinstance(obj, str):
        if obj.startswith(REF_PREFIX) and is_digest(obj[len(REF_PREFIX) :]):
            return  # a well-formed ref: nothing else fits in it
        if _DATA_URI.match(obj):
            if not allow_data_uris:
                raise ProcessedPayloadError(path, "inline base64 data URI")
        elif _image and len(obj) >= _BASE64_IN_IMAGE_FIELD and _base64_bytes(obj):
            raise ProcessedPayloadError(path, f"base64 of {len(obj)} characters where an image ref belongs")
        elif fmt := _base64_image(obj):
            raise ProcessedPayloadError(path, f"a base64 {fmt} image of {len(obj)} characters")
    elif isinstance(obj, bytes | bytearray | memoryview):
        raise ProcessedPayloadError(path, f"raw bytes ({len(obj)})")
    elif hasattr(obj, "__array__") or hasattr(obj, "__array_interface__") or type(obj).__name__ == "Tensor":
        raise ProcessedPayloadError(path, f"array/tensor of type {type(obj).__name__}")
    elif isinstance(obj, _Strict):
        return  # our own models check themselves when they are built
    elif obj is not None and not isinstance(obj, int | float | bool):
        raise ProcessedPayloadError(path, f"object of type {type(obj).__name__}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_processed_payloads(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nested = _strict_fields(cls)  # each of those models checks its own input when built
            reject_processed({k: v for k, v in data.items() if k not in nested}, f"${cls.__name__}")
        return data


@functools.cache
def _strict_fields(model: type[_Strict]) -> frozenset[str]:
    """The fields of ``model`` that hold :class:`_Strict` models (alone, or in a list or tuple)."""

    def strict(annotation: Any) -> bool:
        if isinstance(annotation, type) and issubclass(annotation, _Strict):
            return True
        args = typing.get_args(annotation)
        return (
            typing.get_origin(annotation) in (list, tuple)
            and bool(args)
            and all(strict(a) for a in args if a is not Ellipsis)
        )

    return frozenset(name for name, field in model.model_fields.items() if strict(field.annotation))


Digest = Annotated[str, StringConstraints(pattern=r"^blake3:[0-9a-f]{64}$")]
# an index into a vocabulary; sample files store them as int32
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
LayoutScalar = int | float | str | bool | None


class Descriptor(_Strict):
    """One image as every component must see it. Round-trips through JSON losslessly."""

    version: Literal[1] = DESCRIPTOR_VERSION
    modality: Literal["image"] = "image"
    digest: Digest
    mime: str
    width: int = Field(gt=0, description="after EXIF orientation (the decoding rule)")
    height: int = Field(gt=0)
    family: str = Field(description="layout family, e.g. qwen2_vl")
    layout: dict[str, LayoutScalar | list[int] | list[list[int]]] = Field(
        description="the layout config it was computed with"
    )
    fingerprint: str = Field(description="short hash of family + layout config")
    grid: tuple[int, ...] = Field(
        description="grid_thw for Qwen-style families, the family's geometry otherwise"
    )
    num_tokens: int = Field(gt=0, description="image placeholder tokens in the prompt")

    @property
    def ref(self) -> str:
        from .digest import make_ref

        return make_ref(self.digest)


class ImageSpan(_Strict):
    """Where one image's placeholder run sits in a token sequence: ``ids[start:start+length]``."""

    start: int = Field(ge=0)
    length: int = Field(gt=0)
