"""The HTTP service, started with the real uvicorn server on loopback and queried over HTTP."""

from __future__ import annotations

import base64
import json
import os
import tarfile

import pytest
import requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from index_helpers import make_real_run, running_server  # noqa: E402

from index.search import Searcher  # noqa: E402
from index.service.http_common import Limits, ServerSettings  # noqa: E402
from index.service.server import create_app  # noqa: E402
from tests.conftest import SHARDLIGHT  # noqa: E402

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    return make_real_run(tmp_path_factory.mktemp("index-server"), shards=2, samples_per_shard=16)


@pytest.fixture(scope="module")
def searcher(run_out):
    return Searcher(run_out)


@pytest.fixture(scope="module")
def url(run_out, searcher):
    settings = ServerSettings(limits=Limits(max_k=50, max_text_chars=100, max_image_bytes=200_000,
                                            max_body_bytes=400_000), index_name="demo")
    with running_server(create_app(str(run_out), settings, searcher, warm=False)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(run_out, searcher):
    with running_server(create_app(str(run_out), ServerSettings(api_key="s3cret"), searcher, warm=False)) as base:
        yield base


def _tar_member(searcher, key):
    """The image bytes of `key` read the slow way, by scanning its source tar."""
    from shardlight.core.layout import embeddings_path, read_stats

    shard = searcher.shards[searcher.id_of_key(key)]
    with tarfile.open(read_stats(embeddings_path(searcher.out, shard))["url"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
        return tar.extractfile(member).read()


@pytest.mark.timeout(120)
def test_text_search_returns_rows_with_metadata(url, searcher):
    r = requests.get(f"{url}/search", params={"text": "a red circle", "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5
    assert [h["key"] for h in results] == [h.key for h in searcher.search(text="a red circle", k=5)]
    first = results[0]
    assert {"key", "score", "caption", "label", "url", "shard", "synthetic", "image_path"} <= set(first)
    assert first["score"] >= results[-1]["score"]


@pytest.mark.timeout(120)
def test_image_vector_and_key_queries_agree(url, searcher):
    key = searcher.keys[3]
    image = base64.b64encode(_tar_member(searcher, key)).decode()
    by_image = requests.post(f"{url}/search", json={"image": image, "k": 3}, timeout=60).json()["results"]
    by_key = requests.post(f"{url}/search", json={"key": key, "k": 3}, timeout=60).json()["results"]
    vector = searcher.vector_of_key(key).tolist()
    by_vector = requests.post(f"{url}/search", json={"vector": vector, "k": 3}, timeout=60).json()["results"]
    assert by_key[0]["key"] == key and by_key[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["key"] for h in by_vector] == [h["key"] for h in by_key]
    assert by_image[0]["key"] == key  # the stored image embeds back to its own vector


@pytest.mark.timeout(120)
def test_label_filter(url, searcher):
    label = searcher.hits([0], [0.0])[0].label
    results = requests.get(f"{url}/search", params={"text": "a shape", "k": 10, "label": label},
                           timeout=60).json()["results"]
    assert results and {h["label"] for h in results} == {label}


@pytest.mark.timeout(60)
def test_image_route_serves_the_tar_member_bytes(url, searcher):
    key = searcher.keys[5]
    r = requests.get(f"{url}/image/{key}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == _tar_member(searcher, key)
    assert requests.get(f"{url}/image/no-such-key", timeout=30).status_code == 404
    assert requests.get(f"{url}/image/..%2F..%2Fetc%2Fpasswd", timeout=30).status_code == 404


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body, status, message", [
    ({"text": "x", "k": 0}, 400, "k must be at least 1"),
    ({"text": "x", "k": 51}, 400, "over the limit of 50"),
    ({"text": "x" * 101}, 413, "limit is 100"),
    ({"text": "x", "key": "y"}, 400, "exactly one of"),
    ({}, 400, "exactly one of"),
    ({"image": "not base64!"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"not an image").decode()}, 400, "cannot decode the query image"),
    ({"vector": [1.0, 2.0]}, 400, "query vector has 2 dimensions, the index has 128"),
    ({"key": "no-such-key"}, 404, "no sample with key"),
    ({"text": "x", "k": "ten"}, 422, "k: Input should be a valid integer"),
    ({"text": "x", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
])
def test_bad_requests_get_a_clear_4xx(url, body, status, message):
    r = requests.post(f"{url}/search", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.timeout(60)
def test_oversized_and_malformed_bodies(url):
    big = requests.post(f"{url}/search", data=b"{" + b" " * 500_000 + b"}",
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413 and "byte limit" in big.json()["detail"]
    chunked = requests.post(f"{url}/search", data=iter([b"{" + b" " * 300_000, b" " * 300_000 + b"}"]),
                            headers={"Content-Type": "application/json"}, timeout=30)  # no Content-Length
    assert chunked.status_code == 413 and "byte limit" in chunked.json()["detail"]
    broken = requests.post(f"{url}/search", data=b"{not json", headers={"Content-Type": "application/json"},
                           timeout=30)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"]


@pytest.mark.timeout(120)
def test_clip_client_style_knn_request_without_content_type(url, searcher):
    # exactly what clip_retrieval.clip_client.ClipClient sends: a JSON string body, no Content-Type
    payload = {"text": "a blue square", "image": None, "image_url": None, "embedding_input": None,
               "deduplicate": True, "use_safety_model": True, "use_violence_detector": True, "indice_name": "demo",
               "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
               "num_images": 4, "num_result_ids": 4, "verbose": False}
    prepared = requests.Request("POST", f"{url}/knn-service", data=json.dumps(payload)).prepare()
    assert "Content-Type" not in prepared.headers
    r = requests.Session().send(prepared, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and 1 <= len(results) <= 4
    assert {"id", "similarity", "caption", "url"} <= set(results[0])
    assert results[0]["similarity"] >= results[-1]["similarity"]
    by_embedding = requests.post(f"{url}/knn-service", data=json.dumps({
        "embedding_input": searcher.vector_of_key(searcher.keys[0]).tolist(), "modality": "image",
        "num_images": 2, "indice_name": "demo"}), timeout=60).json()
    assert by_embedding[0]["id"] == 0 and by_embedding[0]["key"] == searcher.keys[0]


def _row_of(run_out, key) -> dict:
    """The key's row read straight from the Parquet (the oracle for what the service returns)."""
    import pyarrow.parquet as pq

    table = pq.read_table(run_out / "embeddings", columns=["key", "caption", "url"])
    return next(r for r in table.to_pylist() if r["key"] == key)


def _knn(url, **body):
    payload = {"indice_name": "demo", "modality": "image", "num_images": 4, "deduplicate": False, **body}
    return requests.post(f"{url}/knn-service", data=json.dumps(payload), timeout=60)


@pytest.mark.timeout(120)
def test_knn_service_by_base64_image_returns_what_clip_client_reads(url, searcher, run_out):
    """ClipClient sends a local image file as base64 `image` and reads id, similarity, url and caption."""
    key = searcher.keys[7]
    r = _knn(url, image=base64.b64encode(_tar_member(searcher, key)).decode())
    assert r.status_code == 200, r.text
    results = r.json()
    assert len(results) == 4 and results[0]["key"] == key
    assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)  # its own stored image
    by_vector = searcher.search(vector=searcher.vector_of_key(key), k=4)
    for got, want in zip(results, by_vector):
        row = _row_of(run_out, got["key"])
        assert got["id"] == searcher.id_of_key(got["key"]) and isinstance(got["id"], int)
        assert got["url"] == row["url"] and got["caption"] == row["caption"] and got["url"]
        assert got["key"] == want.key and got["similarity"] == pytest.approx(want.score, abs=1e-3)
    assert [h["similarity"] for h in results] == sorted((h["similarity"] for h in results), reverse=True)
    metadata = requests.post(f"{url}/metadata", data=json.dumps({"ids": [results[0]["id"]], "indice_name": "demo"}),
                             timeout=30).json()
    assert metadata[0]["metadata"]["caption"] == results[0]["caption"]  # the id leads back to the same row


@pytest.mark.timeout(60)
def test_knn_service_image_url_is_refused_clearly(url):
    """ClipClient sends an http(s) `image` as `image_url`; this server fetches no URLs and says so."""
    r = _knn(url, image_url="http://example.com/cat.jpg")
    assert r.status_code == 400
    assert "image_url is not supported (the server fetches no URLs); send the image base64" in r.json()["detail"]


@pytest.mark.timeout(60)
def test_clip_back_indices_and_metadata(url, searcher):
    assert requests.post(f"{url}/indices-list", timeout=30).json() == ["demo"]
    meta = requests.post(f"{url}/metadata", data=json.dumps({"ids": [0, 2], "indice_name": "demo"}), timeout=30)
    assert [m["id"] for m in meta.json()] == [0, 2]
    assert meta.json()[1]["metadata"]["key"] == searcher.keys[2]
    unknown = requests.post(f"{url}/knn-service", data=json.dumps({"text": "x", "modality": "image",
                                                                    "num_images": 2, "indice_name": "laion5B"}))
    assert unknown.status_code == 404 and "demo" in unknown.json()["detail"]
    text_modality = requests.post(f"{url}/knn-service", data=json.dumps({"text": "x", "modality": "text",
                                                                          "num_images": 2, "indice_name": "demo"}))
    assert text_modality.status_code == 400 and "modality" in text_modality.json()["detail"]


@pytest.mark.timeout(60)
def test_api_key_required_when_configured(keyed_url, url):
    assert requests.get(f"{url}/search", params={"key": "x"}, timeout=30).status_code == 404  # open server
    no_key = requests.get(f"{keyed_url}/search", params={"text": "a"}, timeout=30)
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
    wrong = requests.get(f"{keyed_url}/search", params={"text": "a"}, headers={"X-API-Key": "nope"}, timeout=30)
    assert wrong.status_code == 401
    assert requests.post(f"{keyed_url}/knn-service", data="{}", timeout=30).status_code == 401
    ok = requests.get(f"{keyed_url}/search", params={"text": "a", "k": 2}, headers={"X-API-Key": "s3cret"},
                      timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
    bearer = requests.get(f"{keyed_url}/info", headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert bearer.status_code == 200
    assert requests.get(f"{keyed_url}/health", timeout=30).status_code == 200  # liveness stays open
    assert requests.get(f"{keyed_url}/", timeout=30).status_code == 200  # the page asks for the key itself


@pytest.mark.timeout(60)
def test_docs_page_and_metrics(url):
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert {"/search", "/knn-service", "/indices-list", "/metadata", "/image/{key}"} <= set(paths)
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and 'id="results"' in page.text
    requests.get(f"{url}/search", params={"text": "a", "k": 1}, timeout=60)
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    assert 'shardlight_requests_total{route="/search",method="GET",status="200"}' in metrics
    assert "shardlight_request_seconds_bucket" in metrics and "shardlight_index_vectors 32" in metrics


@pytest.mark.timeout(180)
def test_serve_command_binds_a_free_port_reports_it_and_refuses_requests_without_the_key(run_out):
    """`shardlight serve OUT --port 0 --api-key K` as a user runs it: the port it names answers, keyed."""
    import queue
    import re
    import signal
    import subprocess
    import threading
    import time

    proc = subprocess.Popen([SHARDLIGHT, "serve", str(run_out), "--port", "0", "--api-key", "s3cret"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while not (bound := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", "".join(seen))):
            seen.append(lines.get(timeout=120))  # a timeout here fails the test with queue.Empty
        base = f"http://127.0.0.1:{bound.group(1)}"
        assert "API key required" in "".join(seen)
        refused = requests.get(f"{base}/search", params={"text": "a red circle"}, timeout=30)
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["detail"]
        assert requests.post(f"{base}/knn-service", data="{}", timeout=30).status_code == 401
        ok = requests.get(f"{base}/search", params={"text": "a red circle", "k": 3}, headers={"X-API-Key": "s3cret"},
                          timeout=60)
        assert ok.status_code == 200 and len(ok.json()["results"]) == 3
        # ready once the warm-up thread has loaded CLIP, which on a loaded machine may finish after the search
        deadline = time.monotonic() + 60
        while (health := requests.get(f"{base}/health", timeout=30)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health.status_code == 200, health.text
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down cleanly
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
