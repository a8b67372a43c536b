"""The web page's routes: HTML pages at ``/`` and ``/models/...``, their JSON under ``/web/api``, and assets.

Pages answer an HTML error page for an unknown model or version; the JSON endpoints answer
``{"error": "..."}`` with the status of the error's kind, like the V2 REST API.

A loaded version whose folder was removed from disk still serves from memory (model control mode
``none`` never reloads it): its page is shown without the file's header and graph, and its graph,
weights and diff documents answer 404 saying so (``documents.FileGoneError``), never a path or a 5xx;
the server logs it once per version, at INFO.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from onnxserve.core.client_text import shown
from onnxserve.core.service import InferenceService
from onnxserve.errors import InvalidInputError, OnnxServeError
from onnxserve.log_throttle import log_unexpected
from onnxserve.protocols.errors import HTTP_STATUS
from onnxserve.protocols.http import error_response, guarded, json_body
from onnxserve.protocols.public_errors import public_message
from onnxserve.server.web import documents, overview, pages
from onnxserve.toolkit.visualize.html import viewer_assets

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Scripts only from this server: markup that slipped into a page still could not run."""

SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

PageHandler = Callable[[Request], Awaitable[str | Response]]

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _page_assets() -> dict[str, tuple[bytes, str]]:
    """The page's own script and style sheet, shipped in the package (``static/``)."""
    folder = resources.files("onnxserve.server.web") / "static"
    found = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if suffix in _TYPES:
            found[item.name] = (item.read_bytes(), _TYPES[suffix])
    return found


def _viewer_assets() -> dict[str, tuple[bytes, str]]:
    """The graph viewer's script and style sheet, shared with ``onnxserve inspect --format html``."""
    js, css = viewer_assets()
    return {"viewer.js": (js.encode(), _TYPES[".js"]), "viewer.css": (css.encode(), _TYPES[".css"])}


def html_page(handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """An HTML endpoint: domain errors become an error page with their kind's status."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except OnnxServeError as e:
            status = HTTP_STATUS[e.kind]
            return HTMLResponse(pages.error_page(status, public_message(e)), status, headers=SECURITY_HEADERS)
        except Exception:
            log_unexpected(log, "web page", "unexpected error while rendering %s", request.url.path)
            return HTMLResponse(pages.error_page(500, "internal server error"), 500, headers=SECURITY_HEADERS)
        if isinstance(result, Response):
            return result
        return HTMLResponse(result, headers=SECURITY_HEADERS)

    return endpoint


def routes(service: InferenceService, document_memory: int = documents.MEMORY) -> list[Route]:
    """Every route of the web page; its documents are computed within ``document_memory`` bytes."""
    assets = {**_page_assets(), **_viewer_assets()}
    netron = importlib.util.find_spec("netron") is not None

    cache = documents.DocumentCache(memory=document_memory)
    gone_logged: set[str] = set()  # the files of loaded versions already logged as gone

    def model_file(name: str, version: str) -> Path:
        """The file of a loaded version; documents of versions no longer loaded leave the cache.

        A FileGoneError (404) when the version's file was removed from disk (logged once per version)."""
        live = {str(v.folder.model_file) for v in service.registry.versions()}
        cache.retain(live)
        gone_logged.intersection_update(live)
        path = overview.model_file(service, name, version)
        if path.is_file():
            return path
        number = overview.require_version(service, name, version)
        if str(path) not in gone_logged:
            gone_logged.add(str(path))
            log.info(
                "model %s version %s serves from memory but its file %s is no longer on disk: the web page "
                "shows it without its graph, weights and diffs",
                name,
                number,
                path,
            )
        raise documents.FileGoneError(
            f"version {number} of model {shown(name)} is served from memory, but its model file is no longer on "
            "disk: the web page cannot show its graph, weights or diffs until the version is loaded again"
        )

    async def index(request: Request) -> str:
        return pages.index_page(await overview.model_rows(service))

    async def model(request: Request) -> str:
        name = request.path_params["name"]
        service.registry.get(name)  # 404 for a model with no loaded version (it is listed on / with its state)
        rows = [m for m in await overview.model_rows(service) if m.name == name]
        return pages.model_page(rows[0] if rows else overview.ModelRow(name, ()))

    async def version(request: Request) -> str | Response:
        name, named = request.path_params["name"], request.path_params["version"]
        try:
            detail = overview.version_detail(service, name, named, await cache.header(model_file(name, named)))
        except documents.FileGoneError:  # served from memory: the page shows what the server holds
            detail = dataclasses.replace(overview.version_detail(service, name, named), on_disk=False)
        if detail.version != named:  # a label: the page of the version it names
            return RedirectResponse(pages.version_url(name, detail.version), status_code=302)
        return pages.version_page(detail, netron=netron)

    async def diff(request: Request) -> str | Response:
        name = request.path_params["name"]
        versions = overview.loaded_versions(service, name)
        a, b = _diff_pair(service, name, versions, request)
        if (a, b) != (request.query_params.get("a"), request.query_params.get("b")):
            return RedirectResponse(pages.diff_url(name, a, b), status_code=303)
        return pages.diff_page(name, versions, a, b)

    async def asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name not in assets:
            return error_response(f"no such asset: {name}", 404)
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    async def graph(request: Request) -> Response:
        path = model_file(request.path_params["name"], request.path_params["version"])
        return json_body(await cache.graph(path))

    async def weights(request: Request) -> Response:
        path = model_file(request.path_params["name"], request.path_params["version"])
        query = request.query_params
        if "name" not in query:
            raise InvalidInputError("name the initializer: ?name=NAME&offset=0&limit=100")
        offset, limit = _count(query, "offset", 0), _count(query, "limit", 100)
        return json_body(await cache.weight_page(path, query["name"], offset, limit))

    async def diff_document(request: Request) -> Response:
        name = request.path_params["name"]
        a, b = _diff_pair(service, name, overview.loaded_versions(service, name), request)
        return json_body(await cache.diff(model_file(name, a), model_file(name, b)))

    return [
        Route("/", html_page(index), methods=["GET"]),
        Route("/models/{name}", html_page(model), methods=["GET"]),
        Route("/models/{name}/versions/{version}", html_page(version), methods=["GET"]),
        Route("/models/{name}/diff", html_page(diff), methods=["GET"]),
        Route("/web/static/{asset}", asset, methods=["GET"]),
        Route("/web/api/models/{name}/versions/{version}/graph", guarded(graph), methods=["GET"]),
        Route("/web/api/models/{name}/versions/{version}/weights", guarded(weights), methods=["GET"]),
        Route("/web/api/models/{name}/diff", guarded(diff_document), methods=["GET"]),
    ]


MAX_COUNT_DIGITS = 9
"""Query counts (offsets, limits) are below a billion."""


def _count(query: Mapping[str, str], key: str, default: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_COUNT_DIGITS:
        raise InvalidInputError(f"{key} must be a whole number from 0 to {10**MAX_COUNT_DIGITS - 1}, got {shown(raw)}")
    return int(raw)


def _diff_pair(service: InferenceService, name: str, versions: list[str], request: Request) -> tuple[str, str]:
    """The two versions a diff request names (numbers or labels, as numbers); by default the two highest."""
    a, b = request.query_params.get("a"), request.query_params.get("b")
    if a is None and b is None:
        if len(versions) < 2:
            loaded = f"one loaded version ({versions[0]})" if versions else "no loaded version"
            raise InvalidInputError(f"model {name!r} has {loaded}; there is nothing to compare")
        return versions[1], versions[0]
    if a is None or b is None:
        raise InvalidInputError("give both versions to compare: ?a=VERSION&b=VERSION")
    return overview.require_version(service, name, a), overview.require_version(service, name, b)
