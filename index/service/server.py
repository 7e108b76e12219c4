"""The HTTP query service: JSON search API, image bytes, the web page, and clip-retrieval's routes.

    >>> from index.service.server import serve
    >>> serve("out", host="127.0.0.1", port=1234, api_key=None)

Routes: `GET /` (web page), `GET|POST /search`, `GET /image/{key}`, `POST /knn-service`,
`POST /indices-list`, `POST /metadata` (clip-retrieval), `GET /metrics` (Prometheus), `GET /health`,
`GET /docs` (OpenAPI). With an API key configured, every data route needs the `X-API-Key` header.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from index.search import Hit, KeyNotFound, Searcher
from index.service import clip_back
from index.service.http_common import (
    Limits,
    ServerSettings,
    bad_request,
    check_api_key,
    check_k,
    check_text,
    decode_image,
    hit_json,
    validation_message,
)
from index.service.images import ImageStore, ImageUnavailable
from index.service.metrics import Metrics
from shardlight.core.errors import InputError, ShardlightError

log = logging.getLogger("shardlight")
STATIC = Path(__file__).parent / "static"


class SearchRequest(BaseModel):
    """Exactly one of text, image, vector or key."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="text query")
    image: str | None = Field(None, description="base64 image bytes (or a data: URL)")
    vector: list[float] | None = Field(None, description="a query embedding (normalised by the server)")
    key: str | None = Field(None, description="an indexed sample's key: more like this")
    k: int = Field(10, description="number of results")
    label: str | None = Field(None, description="keep only results with this label")
    synthetic: bool | None = Field(None, description="true: only generated rows; false: only input rows")


def _hit_fields() -> dict:
    """Every field of `index.search.Hit`, as required pydantic fields."""
    hints = get_type_hints(Hit)
    return {f.name: (hints[f.name], ...) for f in fields(Hit)}


# One result in a response: a `Hit` plus where to fetch its image (one definition of the fields, in Hit).
SearchHit = create_model("SearchHit", **_hit_fields(), image_path=(str, ...))


class SearchResponse(BaseModel):
    results: list[SearchHit]
    took_ms: float


def _run_search(request: Request, body: SearchRequest) -> dict:
    limits: Limits = request.app.state.settings.limits
    searcher: Searcher = request.app.state.searcher
    start = time.perf_counter()
    hits = searcher.search(text=check_text(body.text, limits), image=decode_image(body.image, limits),
                           vector=body.vector, key=body.key, k=check_k(body.k, limits), label=body.label,
                           synthetic=body.synthetic)
    return {"results": [hit_json(h) for h in hits], "took_ms": round((time.perf_counter() - start) * 1e3, 3)}


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (declared or streamed) with 413.

    The body is read here, up to the limit, and replayed to the app: a chunked upload without a
    Content-Length is cut off at the limit instead of being buffered whole by the route.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body is over the {limit} byte limit"}, status_code=413)


def _install_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": validation_message(err.errors())}, status_code=422)

    @app.exception_handler(ShardlightError)
    async def expected(request: Request, err: ShardlightError):
        status = 404 if isinstance(err, (ImageUnavailable, KeyNotFound)) else 400 if isinstance(err, InputError) \
            else 503
        return JSONResponse({"detail": str(err)}, status_code=status)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.observe(route, request.method, response.status_code, time.perf_counter() - start)
        return response


def create_app(out: str, settings: ServerSettings = ServerSettings(), searcher: Searcher | None = None,
               warm: bool = True) -> FastAPI:
    """The FastAPI app serving OUT's index; `warm` loads the CLIP model in the background at startup."""
    searcher = searcher or Searcher(out)
    metrics = Metrics()
    metrics.gauge("index_vectors", "Vectors in the served index.", searcher.size)

    ready = threading.Event()  # /health says "ok" only once a text or image query will not wait for CLIP

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:
            threading.Thread(target=_warm, args=(searcher, ready), daemon=True, name="warm-clip").start()
        else:
            ready.set()
        yield

    app = FastAPI(title="shardlight search", version="1", lifespan=lifespan,
                  description="Search CLIP embeddings of a shardlight run by text, image, vector or key.")
    app.state.searcher, app.state.settings, app.state.metrics = searcher, settings, metrics
    app.state.ready = ready
    app.state.images = ImageStore(searcher)
    _install_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.include_router(clip_back.router)
    _add_routes(app)
    return app


def _warm(searcher: Searcher, ready: threading.Event) -> None:
    try:
        searcher.embed_text("warm-up")  # builds the model and runs it once (the first forward pass is the slow one)
    except ShardlightError as err:
        log.warning("text and image queries will fail: %s", err)
    finally:
        ready.set()


def _add_routes(app: FastAPI) -> None:
    auth = [Depends(check_api_key)]

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", include_in_schema=False)
    def health():
        if not app.state.ready.is_set():  # a load balancer keeps traffic away until the model is loaded
            return JSONResponse({"status": "warming up", "vectors": app.state.searcher.size}, status_code=503)
        return {"status": "ok", "vectors": app.state.searcher.size}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics():
        return PlainTextResponse(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/search", response_model=SearchResponse, dependencies=auth, summary="search (JSON body)")
    def search_post(body: SearchRequest, request: Request):
        return _run_search(request, body)

    @app.get("/search", response_model=SearchResponse, dependencies=auth, summary="search by text or key")
    def search_get(request: Request, text: str | None = None, key: str | None = None,
                   k: int = Query(10), label: str | None = None, synthetic: bool | None = None):
        return _run_search(request, SearchRequest(text=text, key=key, k=k, label=label, synthetic=synthetic))

    @app.get("/image/{key}", dependencies=auth, summary="image bytes of an indexed key",
             responses={200: {"content": {"image/jpeg": {}}}})
    def image(key: str, request: Request):
        if len(key) > 512:
            raise bad_request("key is too long")
        data, media_type = request.app.state.images.read(key)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/info", dependencies=auth, summary="index description and labels")
    def info(request: Request):
        searcher: Searcher = request.app.state.searcher
        meta = searcher.meta
        return {"name": app.state.settings.index_name, "vectors": searcher.size, "dim": meta["dim"],
                "factory": meta["factory"], "tuning": {k: v for k, v in (meta.get("tuning") or {}).items()
                                                       if k != "curve"},
                "labels": searcher.labels(), "limits": app.state.settings.limits.__dict__}


def serve(out: str, host: str = "127.0.0.1", port: int = 1234, api_key: str | None = None,
          index_name: str | None = None, limits: Limits = Limits()) -> None:
    """Serve OUT's index over HTTP until interrupted."""
    import uvicorn

    searcher = Searcher(out)
    name = index_name or Path(str(out).rstrip("/")).name or "image"
    app = create_app(out, ServerSettings(limits=limits, api_key=api_key, index_name=name), searcher)
    log.info("serving %d vectors from %s on http://%s:%d (index name %r)", searcher.size, out, host, port, name)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
