"""The explorer's web app (Starlette): one page, its static files and a JSON API.

=======  ===============================  ==================================================
method   path                             answer
=======  ===============================  ==================================================
GET      ``/``                            the page (``static/index.html``)
GET      ``/api/info``                    the run, attributes, modes, defaults, display rules
GET      ``/api/queries``                 query images (``order``, ``search``, ``offset``,
                                          ``limit``) with AP and first-match rank
GET      ``/api/rank``                    the explained top k of ``query`` / ``file`` /
                                          ``upload`` (``k``, ``threshold``, ``mode``,
                                          ``ignore``, ``require``, ``forbid``)
POST     ``/api/rank``                    the same for an image sent as the request body;
                                          the answer's ``upload`` id ranks it again by GET
GET      ``/api/metrics``                 mAP / rank-1 of the whole split with a steering
GET      ``/api/image/{split}/{key}``     an image by index (``query``, ``gallery``) or
                                          upload id (``upload``)
GET      ``/api/maps``                    an attribute map overlay (PNG) when a provider is
                                          configured
=======  ===============================  ==================================================

Safety (``docs/explorer.md``, "Security"): the app answers only requests whose ``Host`` is one
of ``allowed_hosts`` (loopback names by default: a web page elsewhere cannot reach it through
DNS rebinding); images are served by index from the dataset scan, never by a path from the
request; an upload is bounded in bytes while it streams in and in pixels before it is decoded;
every bad parameter is a 400 with a JSON ``{"error", "parameter"}`` naming it; an unexpected
error is a 500 with a JSON message and the server goes on serving. Every response carries a
strict Content-Security-Policy (scripts, styles and images only from the app itself).
"""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import settings
from reid_jax.explain.figures import PNG_COMPRESS_LEVEL, overlay_image, overlay_scale
from reid_jax.explorer import params, uploads
from reid_jax.explorer.rankings import Explorer, QueryRef

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_LIST = 5000
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class PayloadTooLarge(Exception):
    """A request body over the upload limit."""


def _error(status: int, message: str, parameter: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})


class _SecurityHeaders:
    """ASGI middleware: the security headers on every response; no caching of API answers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_api = scope.get("path", "").startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [h for h in _SECURITY_HEADERS if h[0] not in names]
                if is_api and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (stops reading past it)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise params.BadParameter("content-length", f"bad Content-Length {length!r}")
        if int(length) > limit:
            raise PayloadTooLarge(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _overlay_png(values: np.ndarray, scale: float) -> bytes:
    """A PNG overlay of a signed map ``[H, W]`` at its own size, in the report's colours (red
    positive, blue negative, more opaque with ``|value| / scale``; ``figures.overlay_image``)."""
    v = np.asarray(values, np.float32) / max(scale, 1e-30)
    out = io.BytesIO()
    overlay_image([v], (v.shape[1], v.shape[0])).save(out, "PNG",
                                                      compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def create_app(explorer: Explorer, *, max_upload_bytes: int = uploads.DEFAULT_MAX_BYTES,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> Starlette:
    """The app over a loaded :class:`Explorer` (serve it with uvicorn: ``tools/serve.py``).

    Args:
      explorer: the loaded run.
      max_upload_bytes: the largest request body ``POST /api/rank`` reads (413 beyond).
      allowed_hosts: ``Host`` header values answered (others: 400).
    """
    rank_names = (*params.QUERY_KEYS, *params.RANK_KEYS, *params.STEERING_KEYS)

    def index(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    def info(request: Request) -> Response:
        params.check_names(request.query_params, ())
        return JSONResponse({**explorer.info(), "max_upload_bytes": max_upload_bytes,
                             "max_upload_pixels": explorer.max_upload_pixels})

    def queries(request: Request) -> Response:
        p = params.check_names(request.query_params, ("order", "search", "offset", "limit"))
        order = params.choice(p, "order", settings.ORDERS, "worst_ap")
        search = p.get("search", "")
        if len(search) > 200:
            raise params.BadParameter("search", "search must be at most 200 characters")
        n = len(explorer.queries_split)
        return JSONResponse(explorer.queries(
            order=order, search=search.strip(), offset=params.integer(p, "offset", 0, 0, n),
            limit=params.integer(p, "limit", 100, 1, MAX_LIST)))

    def rank_get(request: Request) -> Response:
        p = params.check_names(request.query_params, rank_names)
        ref = params.query(p, explorer)
        opts = params.rank_settings(p, explorer)
        return JSONResponse(explorer.rank(ref, steer=params.steer(p), **opts))

    async def rank_post(request: Request) -> Response:
        p = params.check_names(request.query_params,
                               (*params.RANK_KEYS, *params.STEERING_KEYS, "name"))
        opts = params.rank_settings(p, explorer)
        steer = params.steer(p)
        if not explorer.can_upload:
            return _error(501, "this explorer has no model (started from arrays): uploaded "
                               "images cannot be embedded")
        body = await _read_body(request, max_upload_bytes)
        item = await run_in_threadpool(explorer.add_upload, body, p.get("name"))
        answer = await run_in_threadpool(explorer.rank, QueryRef("upload", item.id),
                                         steer=steer, **opts)
        return JSONResponse(answer)

    def metrics(request: Request) -> Response:
        p = params.check_names(request.query_params, params.STEERING_KEYS)
        return JSONResponse(explorer.split_metrics(params.steer(p)))

    def image(request: Request) -> Response:
        split, key = request.path_params["split"], request.path_params["key"]
        params.check_names(request.query_params, ())
        headers = {"cache-control": "private, max-age=3600"}
        if split == "upload":
            item = explorer.upload(key)
            return Response(item.jpeg, media_type="image/jpeg", headers=headers)
        if split not in ("query", "gallery"):
            raise LookupError(f"no image split {split!r}: use query, gallery or upload")
        if not key.isdigit():
            raise params.BadParameter("index", f"the image index must be an integer, got "
                                               f"{key!r}")
        path = explorer.image_path(split, int(key))
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers=headers)

    def maps(request: Request) -> Response:
        p = params.check_names(request.query_params,
                               (*params.QUERY_KEYS, "gallery", "attribute", "mode", "side"))
        if not explorer.pair_maps:
            raise LookupError("attribute maps are not available on this server")
        ref = params.query(p, explorer)
        gallery = params.integer(p, "gallery", None, 0, len(explorer.gallery_split) - 1)
        attribute = params.choice(p, "attribute", ATTRIBUTE_NAMES, ATTRIBUTE_NAMES[0])
        mode = params.choice(p, "mode", settings.MODES, explorer.settings.mode)
        if mode not in explorer.map_modes:
            raise params.BadParameter("mode", f"mode={mode!r} has no attribute maps: maps "
                                              f"decompose the errors of the modes "
                                              f"{', '.join(explorer.map_modes)}")
        side = params.choice(p, "side", ("query", "gallery"), "query")
        qm, gm = explorer.maps(ref, gallery, mode)
        a = ATTRIBUTE_NAMES.index(attribute)
        scale = overlay_scale(np.stack([qm[a], gm[a]]))
        png = _overlay_png(qm[a] if side == "query" else gm[a], scale)
        return Response(png, media_type="image/png")

    async def bad_parameter(request: Request, exc: params.BadParameter) -> Response:
        return _error(400, exc.message, exc.name)

    async def upload_error(request: Request, exc: uploads.UploadError) -> Response:
        return _error(400, str(exc), "body")

    async def too_large(request: Request, exc: PayloadTooLarge) -> Response:
        return _error(413, f"the upload is larger than {max_upload_bytes:,} bytes (the server's "
                           "limit, --max_upload_bytes)", "body")

    async def not_found(request: Request, exc: LookupError) -> Response:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        return _error(404, message)

    async def value_error(request: Request, exc: ValueError) -> Response:
        return _error(400, str(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, exc.detail or "error")

    async def server_error(request: Request, exc: Exception) -> Response:
        logging.exception("explorer: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server goes on serving")

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/queries", queries),
        Route("/api/rank", rank_get, methods=["GET"]),
        Route("/api/rank", rank_post, methods=["POST"]),
        Route("/api/metrics", metrics),
        Route("/api/image/{split}/{key}", image),
        Route("/api/maps", maps),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    handlers = {params.BadParameter: bad_parameter, uploads.UploadError: upload_error,
                PayloadTooLarge: too_large, LookupError: not_found, ValueError: value_error,
                HTTPException: http_error, Exception: server_error}
    middleware = [Middleware(_SecurityHeaders),
                  Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


__all__ = ["CSP", "LOOPBACK_HOSTS", "STATIC_DIR", "create_app"]
