"""Pieces shared by the HTTP routes: limits, the API-key check, query decoding and error shaping."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from index.search import Hit


@dataclass(frozen=True)
class Limits:
    max_k: int = 1000  # results per query (num_images for clip-retrieval clients)
    max_text_chars: int = 1000  # a text query longer than this is refused
    max_image_bytes: int = 8 << 20  # decoded size of a query image
    max_body_bytes: int = 16 << 20  # any request body (base64 image + JSON)


@dataclass(frozen=True)
class ServerSettings:
    limits: Limits = Limits()
    api_key: str | None = None  # when set, data routes need it in the X-API-Key header
    index_name: str = "image"  # the name clip-retrieval clients pass as indice_name


def bad_request(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def check_api_key(request: Request) -> None:
    """Dependency: refuse data routes without the configured key (no-op when none is configured)."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})


def check_text(text: str | None, limits: Limits) -> str | None:
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise bad_request("text query is empty")
    if len(text) > limits.max_text_chars:
        raise bad_request(f"text query is {len(text)} characters; the limit is {limits.max_text_chars}", 413)
    return text


def check_k(k: int, limits: Limits, name: str = "k") -> int:
    if k < 1:
        raise bad_request(f"{name} must be at least 1")
    if k > limits.max_k:
        raise bad_request(f"{name}={k} is over the limit of {limits.max_k}")
    return k


def decode_image(b64: str | None, limits: Limits) -> bytes | None:
    """Base64 (optionally a data: URL) → bytes, refusing oversized or malformed input."""
    if b64 is None:
        return None
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[-1]
    if len(b64) > limits.max_image_bytes * 4 // 3 + 4:
        raise bad_request(f"image is over the {limits.max_image_bytes} byte limit", 413)
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image is not valid base64") from None
    if not data:
        raise bad_request("image is empty")
    return data


def hit_json(hit: Hit) -> dict:
    """A hit as the JSON API returns it, with the URL of its image on this server."""
    return {**hit.to_dict(), "image_path": f"/image/{hit.key}"}


def validation_message(errors: list) -> str:
    """One line for the first pydantic error: `body.k: Input should be greater than or equal to 1`."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
