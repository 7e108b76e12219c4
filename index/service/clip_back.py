"""Routes compatible with clip-retrieval's `clip back`, so its `ClipClient` works unchanged.

ClipClient posts a JSON body *without* a Content-Type header and reads `.json()` whatever the status,
so these routes parse bodies regardless of Content-Type and always answer JSON. Request fields and the
response shape follow clip_back.py: `POST /knn-service` → `[{"id", "similarity", "caption", "url", …}]`,
`POST /indices-list` → `["name"]`, `POST /metadata` with `{"ids": [...]}` → `[{"id", "metadata"}]`.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from index.search import Hit, Searcher
from index.service.http_common import bad_request, check_api_key, check_k, check_text, decode_image, hit_json

DEDUP_THRESHOLD = 0.94  # clip back's: results closer than this to a better one are dropped



class JsonBodyRoute(APIRoute):
    """Reads the body as JSON whatever its Content-Type says (clip back's `get_json(force=True)`)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def as_json(request: Request):
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            request.__dict__.pop("_headers", None)  # drop a cached view of the old headers
            return await handler(request)

        return as_json


router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(check_api_key)], tags=["clip-retrieval"])


class KnnRequest(BaseModel):
    """clip back's request; fields ClipClient sends that do not apply here are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64 image bytes")
    image_url: str | None = Field(None, description="not supported: the server fetches no URLs")
    embedding_input: list[float] | None = None
    modality: str = Field("image", description="only 'image': the index holds image embeddings")
    num_images: int = 40
    num_result_ids: int | None = None
    indice_name: str | None = None
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    use_mclip: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None
    label: str | None = Field(None, description="shardlight extension: keep only this label")
    synthetic: bool | None = Field(None, description="shardlight extension: filter generated rows")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int]
    indice_name: str | None = None


def _searcher(request: Request, indice_name: str | None) -> Searcher:
    name = request.app.state.settings.index_name
    if indice_name not in (None, "", name):
        raise bad_request(f"unknown indice_name {indice_name!r}; this server has [{name!r}]", 404)
    return request.app.state.searcher


def _knn_result(hit: Hit) -> dict:
    return {**hit_json(hit), "id": hit.id, "similarity": hit.score}


def _dedup(searcher: Searcher, ids: np.ndarray) -> np.ndarray:
    """Keep each result unless it is within DEDUP_THRESHOLD of a better-ranked kept one."""
    vectors = np.stack([searcher.vector_of_id(int(i)) for i in ids]) if len(ids) else np.zeros((0, 1))
    keep: list[int] = []
    for i, v in enumerate(vectors):
        if not keep or float(np.max(vectors[keep] @ v)) < DEDUP_THRESHOLD:
            keep.append(i)
    return np.asarray(keep, np.int64)


@router.post("/knn-service", summary="clip-retrieval knn query (text, base64 image or embedding)")
def knn_service(body: KnnRequest, request: Request) -> list[dict]:
    searcher = _searcher(request, body.indice_name)
    limits = request.app.state.settings.limits
    if body.modality != "image":
        raise bad_request(f"modality {body.modality!r} is not served: this index holds image embeddings; "
                          "use modality 'image' (text queries still work)")
    if body.image_url:
        raise bad_request("image_url is not supported (the server fetches no URLs); send the image base64")
    text = check_text(body.text, limits) if body.text else None
    image = decode_image(body.image, limits) if body.image else None
    given = [x for x in (text, image, body.embedding_input) if x is not None]
    if len(given) != 1:
        raise bad_request("must fill exactly one of text, image and embedding_input")
    num_images = check_k(body.num_images, limits, "num_images")
    fetch = check_k(max(num_images, body.num_result_ids or num_images), limits, "num_result_ids")
    query = searcher.query_vector(text=text, image=image, vector=body.embedding_input)
    scores, ids = searcher.neighbors(query, fetch, label=body.label, synthetic=body.synthetic)
    if body.deduplicate and len(ids):
        keep = _dedup(searcher, ids)
        scores, ids = scores[keep], ids[keep]
    return [_knn_result(h) for h in searcher.hits(ids[:num_images], scores[:num_images])]


@router.post("/indices-list", summary="names of the served indices")
def indices_list(request: Request) -> list[str]:
    return [request.app.state.settings.index_name]


router.get("/indices-list", summary="names of the served indices (GET)", operation_id="indices_list_get")(indices_list)


@router.post("/metadata", summary="metadata of ids returned by /knn-service")
def metadata(body: MetadataRequest, request: Request) -> list[dict]:
    searcher = _searcher(request, body.indice_name)
    check_k(len(body.ids) or 1, request.app.state.settings.limits, "number of ids")
    bad = [i for i in body.ids if not 0 <= i < searcher.size]
    if bad:
        raise bad_request(f"unknown id {bad[0]} (ids run from 0 to {searcher.size - 1})", 404)
    hits = searcher.hits(body.ids, [float("nan")] * len(body.ids))
    return [{"id": h.id, "metadata": {k: v for k, v in hit_json(h).items() if k not in ("id", "score")}}
            for h in hits]
