"""The one walker over the media parts of chat messages (offload, renderer and endpoints use it).

A request body is walked whole (a message list, or a body with ``messages``), nested parts and
tool results included, in document order, which is the order chat templates emit the parts in.
An image part is any dict with an ``image_url``: ``{"type": "image_url", "image_url": {"url":
...}}``, the plain-string form ``"image_url": "..."``, and the Responses API's ``input_image``.
Video parts (``video_url``, ``{"type": "video"}``, ``input_video``) are found too, so that callers
can refuse them by name instead of dropping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VIDEO_TYPES = frozenset({"video", "video_url", "input_video"})


@dataclass(frozen=True)
class ImagePart:
    """One image URL in a body, where it is, and how to replace it."""

    path: tuple[str | int, ...]  # (2, "content", 1) for a message list
    root: str  # "messages" for a message list, "" for a body
    container: dict  # the dict holding the URL: the part, or its ``image_url`` object
    key: str  # "url" in {"url": ...}, or "image_url" when the URL is a plain string
    url: str

    @property
    def where(self) -> str:
        """Where the part is: ``messages[2].content[1]`` (written when asked: most walks never do)."""
        return _where(self.path, self.root)

    @property
    def in_content(self) -> bool:
        """Whether the part is an entry of a message's ``content`` list (where templates emit
        images), rather than nested deeper (e.g. inside a tool call's structure)."""
        return len(self.path) >= 3 and self.path[-2] == "content" and isinstance(self.path[-1], int)

    @property
    def url_where(self) -> str:
        """Where the URL string itself is: ``messages[2].content[1].image_url.url``."""
        return f"{self.where}.image_url.url" if self.key == "url" else f"{self.where}.image_url"

    @property
    def message(self) -> int:
        """The index of the message holding the part."""
        return next(p for p in self.path if isinstance(p, int))


def _where(path: tuple[str | int, ...], root: str) -> str:
    out = root
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _walk(body: Any, visit_part) -> None:
    root = "messages" if isinstance(body, list) else ""

    def visit(obj: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(obj, dict):
            visit_part(obj, path, root)
            for k, v in obj.items():
                if k != "image_url" and isinstance(v, dict | list):
                    visit(v, (*path, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                visit(v, (*path, i))

    visit(body, ())


def _image_part(obj: dict, path: tuple[str | int, ...], root: str, found: list[ImagePart]) -> None:
    val = obj.get("image_url")
    if isinstance(val, dict) and isinstance(val.get("url"), str):
        found.append(ImagePart(path, root, val, "url", val["url"]))
    elif isinstance(val, str):
        found.append(ImagePart(path, root, obj, "image_url", val))


def image_parts(body: Any) -> list[ImagePart]:
    """Every image URL in ``body``, in document order."""
    found: list[ImagePart] = []
    _walk(body, lambda obj, path, root: _image_part(obj, path, root, found))
    return found


def media_parts(body: Any) -> tuple[list[ImagePart], list[str]]:
    """:func:`image_parts` of ``body`` and where each video part is (``messages[1].content[0]``),
    in document order, in one walk."""
    images: list[ImagePart] = []
    videos: list[str] = []

    def part(obj: dict, path: tuple[str | int, ...], root: str) -> None:
        _image_part(obj, path, root, images)
        if obj.get("type") in VIDEO_TYPES or "video_url" in obj:
            videos.append(_where(path, root))

    _walk(body, part)
    return images, videos
