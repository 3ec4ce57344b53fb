"""A chat request's prompt: inline images offloaded, their headers fetched, messages rendered.

1. inline images (``data:image/...;base64,`` URIs, http(s) URLs) are offloaded to the store by
   :func:`mmstore_client.offload.aoffload_messages` (the rollout worker's rules and limits, plus the
   layout's size check); mmstore refs pass as they are; any other URL (a local path, ``file://``)
   is refused: the service reads no files;
2. the headers the renderer needs are fetched through the service's store client (verified,
   cached by digest), on the event loop;
3. the sans-I/O renderer renders the messages from scratch, or bridges them onto the previous
   turn's ids when the request carries them (``mmstore.previous_token_ids``), on the one thread
   that uses the tokenizer.

Every failure is raised as the service's own error (:mod:`mmstore_inference.errors`) with a
``param`` naming the part of the request at fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from mmstore_client import AsyncStoreClient, InvalidRef, parse_ref
from mmstore_client.descriptor import ProcessedPayloadError
from mmstore_client.errors import ApiError, AuthError, BadRequestError, TransportError
from mmstore_client.layouts import LayoutRefusal
from mmstore_client.offload import OffloadError, OffloadPolicy, aoffload_messages
from mmstore_client.parts import ImagePart, image_parts
from mmstore_client.placeholders import PlaceholderMismatch as IdsMismatch
from mmstore_client.placeholders import check_runs
from mmstore_client.render import Rendered, Renderer, RenderError, image_refs

from ..errors import (
    InvalidRequest,
    OffloadForbidden,
    PayloadTooLarge,
    PlaceholderMismatch,
    StoreUnavailable,
)
from ..fetch import ImageFetcher
from .schemas import ChatCompletionRequest


@dataclass
class Prompt:
    rendered: Rendered
    mode: Literal["render", "bridge"]
    previous: list[int] | None  # the previous_token_ids the client sent
    extends: bool | None  # whether rendered.token_ids start with them (None: none sent)
    offloaded: list[str]  # digests of the inline images this request offloaded
    image_params: list[str]  # where each image of ``rendered.descriptors`` is in the request
    timings: dict[str, float]  # offload_s, render_s (headers fetched and prompt rendered)


def _after_last_assistant(messages: list[dict]) -> int:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise InvalidRequest(
            "previous_token_ids given, but no assistant message to continue from",
            param="mmstore.previous_token_ids",
        )
    return len(roles) - roles[::-1].index("assistant")


def _render_error(exc: RenderError | ProcessedPayloadError | LayoutRefusal) -> Exception:
    if exc.code == "placeholder_mismatch":
        return PlaceholderMismatch(str(exc), param="messages")
    return InvalidRequest(
        str(exc), code=exc.code, param="tools" if exc.code == "tools_unsupported" else "messages"
    )


class PromptBuilder:
    """Offload, headers and render for one model; ``writer`` holds the store's write scope."""

    def __init__(
        self, renderer: Renderer, fetcher: ImageFetcher, writer: AsyncStoreClient, policy: OffloadPolicy
    ) -> None:
        self.renderer, self.fetcher, self.writer, self.policy = renderer, fetcher, writer, policy
        # a tokenizer must not be used from two threads at once: all its work runs on this one
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-render")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def on_tokenizer_thread(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, lambda: fn(*args, **kwargs))

    async def build(self, body: ChatCompletionRequest, messages: list[dict], run: str) -> Prompt:
        started = time.perf_counter()
        parts = image_parts(messages)
        out, offloaded = await self._offload(messages, parts, run)
        if out is not messages:  # inline images replaced by refs
            messages, parts = out, image_parts(out)
        offloaded_at = time.perf_counter()
        params = [p.url_where for p in parts]
        prompt = await self._render(body, messages, params)
        timings = {"offload_s": offloaded_at - started, "render_s": time.perf_counter() - offloaded_at}
        return Prompt(*prompt, offloaded, params, timings)

    async def _render(
        self, body: ChatCompletionRequest, messages: list[dict], params: list[str]
    ) -> tuple[Rendered, Literal["render", "bridge"], list[int] | None, bool | None]:
        """``params[i]``: where the i-th image part is, to name it in a fetch error."""
        try:
            digests = image_refs(messages)
        except (RenderError, ProcessedPayloadError) as exc:
            raise _render_error(exc) from None
        headers = await self.fetcher.headers(digests, params)
        previous, count = body.mmstore.previous_token_ids, None
        if previous is not None:
            count = body.mmstore.previous_messages_count or _after_last_assistant(messages)
            if count >= len(messages) or messages[count - 1]["role"] != "assistant":
                raise InvalidRequest(
                    f"previous_messages_count={count}: messages[:{count}] must end with the assistant "
                    "message of previous_token_ids, and at least one new message must follow",
                    param="mmstore.previous_messages_count",
                )
        bridge = previous is not None and body.mmstore.bridge
        options = {"tools": body.template_tools, "chat_template_kwargs": body.chat_template_kwargs}
        try:
            if bridge:
                assert previous is not None and count is not None
                rendered = await self.on_tokenizer_thread(
                    self._bridge, previous, messages[:count], messages[count:], headers, options
                )
                return rendered, "bridge", previous, True
            rendered = await self.on_tokenizer_thread(
                self.renderer.render, messages, headers, assistant_mask=False, **options
            )
        except IdsMismatch as exc:
            raise PlaceholderMismatch(
                f"previous_token_ids: {exc}",
                param="mmstore.previous_token_ids",
                image=exc.image,
                expected=exc.expected,
                actual=exc.actual,
            ) from None
        except (RenderError, ProcessedPayloadError, LayoutRefusal) as exc:
            raise _render_error(exc) from None
        extends = None if previous is None else rendered.token_ids[: len(previous)] == previous
        return rendered, "render", previous, extends

    def _bridge(
        self, previous: list[int], history: list[dict], new: list[dict], headers: dict, options: dict
    ) -> Rendered:
        """The history as the client sampled it (its images' runs checked), then the new messages."""
        descriptors = [self.renderer.describe(d, headers[d]) for d in image_refs(history)]
        runs = check_runs(previous, descriptors, self.renderer.image_token_id)
        before = Rendered(list(previous), descriptors, runs, None, history)
        return self.renderer.bridge(before, new, headers, **options)

    async def _offload(
        self, messages: list[dict], parts: list[ImagePart], run: str
    ) -> tuple[list[dict], list[str]]:
        """Refs stay; data URIs and http(s) URLs are offloaded; anything else is refused.
        ``parts``: the image parts of ``messages``."""
        refs, inline = set(), False
        for part in parts:
            if part.url.startswith("mmstore://"):
                try:
                    refs.add(parse_ref(part.url))
                except InvalidRef as exc:
                    raise InvalidRequest(str(exc), code="invalid_ref", param=part.url_where) from None
            elif part.url.startswith(("data:", "http://", "https://")):
                inline = True
            else:
                message = f"{part.url_where}: an image URL is an mmstore ref, a data:image/...;base64 URI or"
                raise InvalidRequest(
                    f"{message} an http(s) URL; got {part.url[:60]!r}",
                    code="url_refused",
                    param=part.url_where,
                )
        if not inline:
            return messages, []
        try:
            out = await aoffload_messages(messages, self.writer, run, self.policy)
        except OffloadError as exc:  # the image's fault: 400, as OpenAI answers a bad image
            error = PayloadTooLarge if exc.code == "payload_too_large" else InvalidRequest
            raise error(str(exc), code=exc.code, param=f"{exc.where}.image_url.url") from None
        except ProcessedPayloadError as exc:
            raise InvalidRequest(str(exc), code=exc.code, param="messages") from None
        except BadRequestError as exc:
            message = f"the store refused run {run!r}: {exc.message}"
            raise InvalidRequest(message, code=exc.code, param="mmstore.run") from None
        except AuthError as exc:
            raise OffloadForbidden(
                f"the store refused the service's upload ({exc.code}): give the service a token with "
                "the write scope (STORE_WRITE_TOKEN)"
            ) from None
        except (TransportError, ApiError) as exc:
            raise StoreUnavailable(f"store unavailable offloading images: {exc}") from None
        digests = dict.fromkeys(parse_ref(p.url) for p in image_parts(out))
        return out, [d for d in digests if d not in refs]
