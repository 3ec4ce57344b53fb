"""The viewer (``/ui``): runs, a run's blobs as thumbnails, rollouts turn by turn.

Server-rendered HTML (Jinja2, autoescaped), no JavaScript: the pages send a Content-Security-
Policy that forbids scripts outright. Same auth as the API, read scope: a bearer token in the
``Authorization`` header, or, for a person with a browser, the same token entered once on
``/ui/login`` and kept in an HttpOnly, SameSite=Strict cookie scoped to ``/ui`` (the API never
reads it). Every page only reads, so the cookie cannot be used to change anything.

Pages page through the storage's paginated ``run_blobs`` (digest cursors): a page costs the
same with 10 or 10,000 blobs in the run. Thumbnails come from :mod:`mmstore.thumbnails`.
Knobs (until they join ``Settings``): ``MMSTORE_UI_THUMB_CACHE_BYTES``,
``MMSTORE_UI_THUMB_WORKERS``, ``MMSTORE_UI_PAGE_SIZE``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from mmstore_client import decode
from mmstore_client.prometheus import Counts
from mmstore_client.rollouts import ROLLOUTS_SUFFIX, RolloutDoc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .. import __version__
from ..bodies import read_body
from ..decoding import Decoder
from ..deps import checked_digest, valid_run
from ..errors import (
    ApiError,
    ForbiddenError,
    NotFoundError,
    UnauthorizedError,
    UnsupportedMediaError,
    from_image_error,
)
from ..metrics import StoreMetrics
from ..settings import Settings
from ..storage.base import Storage
from ..thumbnails import MIME, SIZES, VERSION, ThumbnailCache

COOKIE = "mmstore_token"
_UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_CSS = (_UI_DIR / "static" / "style.css").read_bytes()
_PAGE_HEADERS = {
    # no script can run on these pages; images and the stylesheet come from this origin only
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class ViewerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMSTORE_UI_", extra="ignore")

    thumb_cache_bytes: int = Field(64 << 20, ge=0, description="in-memory thumbnail LRU, bytes")
    thumb_workers: int = Field(2, ge=1, description="thumbnails generated at once (threads)")
    page_size: int = Field(60, ge=1, le=500, description="blobs or rollouts per page")


@dataclass
class Viewer:
    """The viewer's state, made once by ``create_app`` (``app.state.viewer``)."""

    settings: ViewerSettings
    thumbnails: ThumbnailCache

    @classmethod
    def create(cls, store: Settings, storage: Storage, decoder: Decoder, metrics: StoreMetrics) -> Viewer:
        """The viewer over the store's storage and decoder; its thumbnail counters join ``metrics``."""
        settings = ViewerSettings()
        thumbs = ThumbnailCache(
            storage,
            decoder,
            max_bytes=settings.thumb_cache_bytes,
            workers=settings.thumb_workers,
            max_pixels=store.max_image_pixels,
            max_jpeg_scans=store.max_jpeg_scans,
        )
        metrics.registry.register(
            Counts(
                {
                    f"mmstore_ui_thumbnail_cache_{what}": (
                        f"thumbnail cache {what}",
                        lambda what=what: getattr(thumbs, what),
                    )
                    for what in ("hits", "misses", "evictions")
                }
            )
        )
        return cls(settings, thumbs)


# -- templates ------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def age(ts: float, now: float | None = None) -> str:
    s = max(0.0, (now or time.time()) - ts)
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h"), (float("inf"), 86400, "d")):
        if s < limit:
            return f"{s / div:.0f} {unit} ago"
    raise AssertionError("unreachable")


_env = Environment(
    loader=FileSystemLoader(_UI_DIR / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(bytes=human_bytes, age=age, short=lambda d: d.split(":", 1)[-1][:12], q=quote)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    base = request.scope.get("root_path", "").rstrip("/")
    html = _env.get_template(template).render(
        ui=f"{base}/ui",
        version=__version__,
        signed_in=COOKIE in request.cookies and not request.app.state.authorizer.open,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)


# -- auth -----------------------------------------------------------------------------------
def _credentials(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        return header
    token = request.cookies.get(COOKIE)
    return f"Bearer {token}" if token else None


def authorize(request: Request) -> None:
    """401 / 403 unless the request's token (header, else cookie) has the read scope."""
    request.app.state.authorizer.check(_credentials(request), "read")


def _login_page(request: Request, exc: ApiError, next_url: str) -> HTMLResponse:
    response = render(request, "login.html", status=exc.status, message=exc.message, next=next_url)
    if exc.status == 401:
        response.headers["www-authenticate"] = "Bearer"
    return response


def html_page(fn):
    """A page handler: read scope checked first; refusals and errors answered as HTML pages."""

    @functools.wraps(fn)
    def wrapper(request: Request, **kwargs: Any) -> Response:
        try:
            authorize(request)
        except (UnauthorizedError, ForbiddenError) as exc:
            return _login_page(request, exc, request.url.path)
        try:
            return fn(request, **kwargs)
        except ApiError as exc:
            return render(request, "error.html", status=exc.status, code=exc.code, message=exc.message)

    return wrapper


def _safe_next(url: str | None) -> str:
    return url if url and url.startswith("/ui") and not url.startswith("//") else "/ui"


router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/static/style.css")
def stylesheet() -> Response:
    return Response(_CSS, media_type="text/css", headers={"cache-control": "public, max-age=3600"})


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", message=None, next=_safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    body = await read_body(request, request.app.state.settings.max_json_bytes)
    form = parse_qs(body.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    next_url = _safe_next((form.get("next") or [None])[0])
    try:
        request.app.state.authorizer.check(f"Bearer {token}" if token else None, "read")
    except (UnauthorizedError, ForbiddenError) as exc:
        return _login_page(request, exc, next_url)
    response = RedirectResponse(next_url, status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, token, path="/ui", httponly=True, samesite="strict", secure=secure)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("")
@html_page
def runs_page(request: Request) -> HTMLResponse:
    all_runs = request.app.state.storage.runs()
    companions = {r.run[: -len(ROLLOUTS_SUFFIX)]: r for r in all_runs if r.run.endswith(ROLLOUTS_SUFFIX)}
    runs = [r for r in all_runs if not r.run.endswith(ROLLOUTS_SUFFIX)]
    orphans = sorted(set(companions) - {r.run for r in runs})  # rollouts whose run has no blobs
    return render(request, "runs.html", runs=runs, rollouts=companions, orphans=orphans, now=time.time())


@router.get("/runs/{run}")
@html_page
def run_page(
    request: Request,
    run: str,
    cursor: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
) -> HTMLResponse:
    storage = request.app.state.storage
    limit = limit or request.app.state.viewer.settings.page_size
    info = storage.run(valid_run(run))
    blobs = storage.run_blobs(run, limit=limit, cursor=cursor) if info else None
    if info is None or blobs is None:
        raise NotFoundError(f"run {run!r} not found")
    companion = storage.run(run + ROLLOUTS_SUFFIX) if len(run) + len(ROLLOUTS_SUFFIX) <= 128 else None
    return render(
        request,
        "run.html",
        info=info,
        blobs=blobs.blobs,
        next_cursor=blobs.next_cursor,
        page=page,
        limit=limit,
        first=(page - 1) * limit + 1,
        rollouts=companion,
        thumb=256,
        now=time.time(),
    )


@router.get("/runs/{run}/rollouts")
@html_page
def rollouts_page(
    request: Request,
    run: str,
    cursor: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
) -> HTMLResponse:
    limit = limit or request.app.state.viewer.settings.page_size
    result = request.app.state.rollout_docs.page(valid_run(run), limit=limit, cursor=cursor)
    if result is None:
        raise NotFoundError(f"run {run!r} has no rollouts")
    items = sorted(result.rollouts, key=lambda r: (r.step is None, r.step or 0, r.rollout_id))
    return render(
        request,
        "rollouts.html",
        run=run,
        items=items,
        next_cursor=result.next_cursor,
        page=page,
        limit=limit,
        first=(page - 1) * limit + 1,
    )


@dataclass(frozen=True)
class _Part:
    text: str = ""
    image: int | None = None  # index into the document's descriptors


def _parts(prompt: str, images) -> list[_Part]:
    parts, at = [], 0
    for image in images:
        parts += [_Part(text=prompt[at : image.offset]), _Part(image=image.index)]
        at = image.offset
    return [*parts, _Part(text=prompt[at:])]


@router.get("/runs/{run}/rollouts/{digest}")
@html_page
def rollout_page(request: Request, run: str, digest: str) -> HTMLResponse:
    valid_run(run)
    doc: RolloutDoc = request.app.state.rollout_docs.get(checked_digest(digest))
    turns = [(turn, _parts(turn.prompt, turn.images)) for turn in doc.turns]
    return render(
        request,
        "rollout.html",
        run=run,
        digest=digest,
        doc=doc,
        turns=turns,
        image_tokens=sum(d.num_tokens for d in doc.descriptors),
        completion_tokens=sum(t.completion_tokens for t in doc.turns),
        thumb=256,
    )


# -- images ---------------------------------------------------------------------------------
@router.get("/thumbs/{digest}")
async def thumbnail(request: Request, digest: str, size: Annotated[int, Query()] = 256) -> Response:
    """A thumbnail (WebP) of an image blob, fitting in ``size`` x ``size`` (128, 256 or 512)."""
    authorize(request)
    if size not in SIZES:
        raise NotFoundError(f"thumbnail size {size} is not served: use one of {', '.join(map(str, SIZES))}")
    info = await run_in_threadpool(request.app.state.storage.info, checked_digest(digest))
    if info is None:
        raise NotFoundError(f"blob {digest} not found", digest=digest)
    if not info.mime.startswith("image/"):
        raise UnsupportedMediaError(f"blob {digest} is {info.mime}, not an image", digest=digest)
    etag = f'"{digest}-{size}-{VERSION}"'
    headers = {"etag": etag, "cache-control": "private, max-age=31536000, immutable"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    try:
        thumb = await request.app.state.viewer.thumbnails.get(digest, size, info.size)
    except FileNotFoundError:
        raise NotFoundError(f"blob {digest} not found", digest=digest) from None
    except decode.ImageError as exc:
        raise from_image_error(exc) from exc
    return Response(thumb, media_type=MIME, headers=headers)


@router.get("/blobs/{digest}")
async def original(request: Request, digest: str) -> Response:
    """The blob's bytes as stored (what a thumbnail links to), cookie auth included."""
    authorize(request)
    reply = await request.app.state.blob_reader.read(
        digest,
        head=False,
        range_header=request.headers.get("range"),
        if_none_match=request.headers.get("if-none-match"),
        redirect=False,  # the headers below must come with the bytes
    )
    # never rendered as a document of this origin, whatever the bytes are
    headers = {**reply.headers, "x-content-type-options": "nosniff", "content-security-policy": "sandbox"}
    stream = getattr(reply, "stream", None)  # a remote backend streams its bytes
    if stream is not None:
        return StreamingResponse(stream, status_code=reply.status, headers=headers)
    return Response(reply.body, status_code=reply.status, headers=headers)
