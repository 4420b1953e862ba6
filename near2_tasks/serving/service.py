"""The storefront search HTTP service: ``GET /search``, ``GET /health`` and ``GET /served`` (OpenAPI at
``/docs``), and the storefront page at ``/`` (``near2_tasks/serving/static/``: plain HTML + JavaScript that calls
the JSON API; every catalog field is written as text, never as markup).

The same logic as :func:`near2_tasks.serving.search.search`, behind a thin layer that guards the edge:

* bad input -> 4xx with a one-line message (400 for what the search rejects, 422 for wrong types and
  bounds, 413/414 for oversized bodies/URLs); unknown or repeated query parameters are rejected;
* backend failures -> 503 with a generic message and ``Retry-After`` (``serving.retry_after_s``);
  anything unexpected -> 500 "internal error". Responses never carry stack traces, hostnames or local
  paths (details go to the server log).

Every response carries a ``Server-Timing`` header: ``app`` is the time from the request reaching the app to
its response starting (validation, search, serialisation); ``/search`` adds its ``encode``, ``search`` (the
Elasticsearch round trips), ``es`` (Elasticsearch's own ``took``) and ``handler`` (the search as a whole),
the numbers of ``timings_ms``, and ``qcache;desc=hit|miss`` when ``serving.query_cache_size`` is on. A
client's latency minus ``app`` is HTTP and transport time
(``bench/load_benchmark.py`` splits a request's time this way).

Run it with ``near2 serve`` (uvicorn), or ``create_app(settings)`` in any ASGI server.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from near2_tasks.config import Settings, load_settings
from near2_tasks.errors import Near2Error, ServiceUnavailable
from near2_tasks.serving.api_models import ErrorOut, HealthOut, SearchOut, ServedFieldOut, ServedOut
from near2_tasks.serving.hybrid import FUSIONS, weight_for
from near2_tasks.serving.request import MODES, BadSearchRequest, pick_dims
from near2_tasks.serving.search import Searcher
from near2_tasks.serving.served_index import NoServingIndex, ServingIndex

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: the page loads only its own script and style, and calls only this service
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

SEARCH_PARAMS = frozenset({"q", "k", "dim", "mode", "fusion", "category", "brand", "price_min", "price_max",
                           "num_candidates"})


def _error(status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=ErrorOut(error=message, hint=hint).model_dump(exclude_none=True),
                        headers=headers)


def _backend_error(exc: Exception, retry_after_s: int) -> JSONResponse:
    """503 without internals, with ``Retry-After``: the full reason (URL, path) only goes to the log."""
    log.warning("search backend failure: %s", exc)
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, NoServingIndex):
        return _error(503, "no product index is being served yet", headers=retry)
    if isinstance(exc, ServiceUnavailable):
        return _error(503, "the search backend is unavailable; try again shortly", headers=retry)
    return _error(503, "search is temporarily unavailable", headers=retry)


def server_timing(timings_ms: dict[str, float], query_cached: bool | None = None) -> str:
    """``Server-Timing`` entries of a search's ``timings_ms`` (encode, search, es, handler), and whether
    its query vector came from the cache (``qcache;desc=hit|miss``, when the cache is on)."""
    names = (("encode", "encode"), ("search", "search"), ("es_took", "es"), ("total", "handler"))
    entries = [f"{name};dur={timings_ms[key]:.3f}" for key, name in names if key in timings_ms]
    if query_cached is not None:
        entries.append(f"qcache;desc={'hit' if query_cached else 'miss'}")
    return ", ".join(entries)


class ServerTiming:
    """ASGI middleware: appends ``app;dur=<ms>`` (request in -> response start) to ``Server-Timing``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                app_ms = f"app;dur={(time.perf_counter() - began) * 1000:.3f}".encode()
                headers = list(message.get("headers") or [])
                for i, (name, value) in enumerate(headers):
                    if name.lower() == b"server-timing":
                        headers[i] = (name, value + b", " + app_ms)
                        break
                else:
                    headers.append((b"server-timing", app_ms))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


class RequestSizeLimit:
    """ASGI middleware: 414 for a URL longer than ``max_bytes``, 431 for headers larger than it, 413 for
    a body larger than it (declared by Content-Length, or counted while a chunked body arrives)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > self.max_bytes:
            await _error(414, f"request URL longer than {self.max_bytes} bytes")(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        if sum(len(name) + len(value) for name, value in raw_headers) > self.max_bytes:
            await _error(431, f"request headers larger than {self.max_bytes} bytes")(scope, receive, send)
            return
        headers = dict(raw_headers)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _error(413, f"request body larger than {self.max_bytes} bytes")(scope, receive, send)
                return
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    await _error(413, f"request body larger than {self.max_bytes} bytes")(scope, receive, send)
                    return
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


#: the error responses the OpenAPI schema documents for ``/search``
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "Bad search request (unserved dim, empty query, unknown parameter, ...)"),
        (413, "Request body too large"), (414, "Request URL too long"), (431, "Request headers too large"),
        (422, "Parameter of the wrong type or out of bounds"), (503, "Search backend unavailable"))}


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Load the serving model before the first shopper waits for it; a cluster that is not up yet is not
    fatal: /health says so and the first query retries."""
    try:
        searcher = app.state.searcher
        await run_in_threadpool(lambda: searcher.encoder(searcher.serving_index()))
    except Near2Error as exc:
        log.warning("could not preload the serving model: %s", exc)
    yield


def create_app(settings: Settings | None = None, searcher: Searcher | None = None) -> FastAPI:
    """The FastAPI app; ``settings`` default to ``load_settings()`` (NEAR2_CONFIG, env vars)."""
    settings = settings or load_settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="near2 storefront search",
        description="Semantic product search over nested (Matryoshka) embeddings in Elasticsearch. "
                    "Queries are encoded by the model that built the index behind the alias.",
        version="1",
    )
    app.add_middleware(RequestSizeLimit, max_bytes=settings.serving.max_request_bytes)
    app.add_middleware(ServerTiming)
    app.state.searcher = searcher or Searcher(settings)
    _add_error_handlers(app, settings.serving.retry_after_s)
    _add_search_route(app, settings)
    _add_status_routes(app, settings)

    @app.get("/", include_in_schema=False)
    def storefront_page() -> FileResponse:
        return FileResponse(STATIC / "storefront.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """422 for wrong types and bounds, 400 for what the search rejects, 503 for backend failures, 500 else."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid"))

    @app.exception_handler(BadSearchRequest)
    async def _bad_request(request: Request, exc: BadSearchRequest) -> JSONResponse:
        return _error(400, exc.message, exc.hint)

    @app.exception_handler(Near2Error)
    async def _near2_error(request: Request, exc: Near2Error) -> JSONResponse:
        return _backend_error(exc, retry_after_s)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving %s", request.url.path)
        return _error(500, "internal error")


def _check_search_params(request: Request) -> None:
    """Unknown or repeated query parameters are a bad request (FastAPI would silently ignore or take one)."""
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - SEARCH_PARAMS)
    if unknown:
        raise BadSearchRequest(f"unknown parameter(s) {unknown}", hint=f"parameters are {sorted(SEARCH_PARAMS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BadSearchRequest(f"parameter(s) {repeated} given more than once")


def _add_search_route(app: FastAPI, settings: Settings) -> None:
    """``GET /search``, its parameters' bounds from ``serving`` settings."""
    limits = settings.serving

    @app.get("/search", response_model=SearchOut, responses=ERROR_RESPONSES, summary="Search products")
    def search_products(
        request: Request,
        response_headers: Response,
        q: str = Query(..., min_length=1, max_length=limits.max_query_chars, description="The shopper's query."),
        k: int = Query(10, ge=1, le=limits.k_max, description="How many products to return."),
        dim: int | None = Query(None, description="Embedding dimension; one the index serves (see /health)."),
        mode: Literal["knn", "funnel", "hybrid"] | None = Query(
            None, description="knn: one kNN at dim; funnel: small-dim shortlist rescored at dim; hybrid: BM25 "
                              "and kNN at dim fused."),
        fusion: Literal["rrf", "linear"] | None = Query(
            None, description="mode=hybrid: rrf (reciprocal-rank fusion) or linear (normalised scores, the "
                              "weight tuned per dim); default from config."),
        category: str | None = Query(None, max_length=200, description="Exact category."),
        brand: str | None = Query(None, max_length=200, description="Exact brand."),
        price_min: float | None = Query(None, ge=0, allow_inf_nan=False),
        price_max: float | None = Query(None, ge=0, allow_inf_nan=False),
        num_candidates: int | None = Query(None, ge=1, le=limits.max_num_candidates,
                                           description="kNN candidates per shard (default from config)."),
    ) -> dict[str, Any]:
        _check_search_params(request)
        filters = {"category": category, "brand": brand, "price_min": price_min, "price_max": price_max}
        response = app.state.searcher.search(q, k=k, dim=dim, mode=mode, filters=filters,
                                             num_candidates=num_candidates, fusion=fusion)
        response_headers.headers["Server-Timing"] = server_timing(response.timings_ms, response.query_cached)
        return response.to_dict(include_model_uri=False)


def _add_status_routes(app: FastAPI, settings: Settings) -> None:
    """``GET /health`` (readiness) and ``GET /served`` (what is served)."""

    @app.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}}, summary="Readiness")
    def health() -> Any:
        alias = settings.elasticsearch.alias
        try:
            served = app.state.searcher.serving_index(refresh=True)
        except Near2Error as exc:
            log.warning("health check failed: %s", exc)
            reason = "no product index is being served yet" if isinstance(exc, NoServingIndex) \
                else "the search backend is unavailable"
            return JSONResponse(status_code=503, content=HealthOut(
                status="unavailable", alias=alias, error=reason).model_dump(),
                headers={"Retry-After": str(settings.serving.retry_after_s)})
        return HealthOut(status="ok", alias=alias, index=served.name, model_name=served.model_name,
                         model_version=served.model_version, dims=served.dims)

    @app.get("/served", response_model=ServedOut, responses={503: {"model": ErrorOut}},
             summary="What is served: index, model, dims with their bytes per product, modes")
    def served() -> Any:
        searcher = app.state.searcher
        index = searcher.serving_index()
        return _served_out(settings, index, default_dim=pick_dims(searcher.settings, index, None, "knn")[0])


def _served_out(settings: Settings, index: ServingIndex, default_dim: int) -> ServedOut:
    """The ``/served`` answer for ``index``: its model, and per dim its index type, bytes and hybrid weight."""
    fields = []
    for d in index.dims:
        weight, source = weight_for(index, d, settings.serving.hybrid_weight)
        fields.append(ServedFieldOut(dim=d, index_type=index.index_types.get(d, "hnsw"),
                                     bytes_per_product=index.bytes_per_product(d),
                                     bit_code_bytes=d / 8 if d in index.binary_centres else None,
                                     hybrid_weight=weight, hybrid_weight_source=source))
    return ServedOut(alias=index.alias, index=index.name, model_name=index.model_name,
                     model_version=index.model_version, dims=index.dims, fields=fields, modes=list(MODES),
                     default_mode=settings.serving.mode, fusions=list(FUSIONS),
                     default_fusion=settings.serving.hybrid_fusion, lexical_fields=list(index.lexical_fields),
                     default_dim=default_dim)


def app_from_settings() -> FastAPI:
    """``create_app(load_settings())``: the factory each worker of ``near2 serve --workers N`` calls."""
    return create_app(load_settings())
