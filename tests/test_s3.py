"""Object storage for real: shards and every output on an S3-compatible server (moto) on loopback."""

import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)  # the OS picks a free port: no race
    server.start()
    port = server.get_host_and_port()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # set before Ray starts, so its workers see the same endpoint
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    fs.mkdir("shardlight-test")
    yield fs
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_read_write_resume_and_query_on_s3(s3, tmp_path, prefect_server):
    from flows.pipeline import pipeline
    from index.search import Searcher
    from shardlight.core.config import parse_config
    from shardlight.training.synthetic import write_shards

    for path in write_shards(tmp_path / "data", shards=2, samples_per_shard=15, seed=61):
        s3.put(str(path), f"shardlight-test/data/{path.name}")
    cfg = parse_config({
        "input": "s3://shardlight-test/data/{00000..00001}.tar", "output": "s3://shardlight-test/out",
        "clip": {"model": "shapes-clip"}, "labels": {"kind": "vit", "model": "shapes-vit"},
        "ray": {"num_cpus": 2, "num_actors": 1},
    })
    first = pipeline(cfg.model_dump())
    assert first["processed"] == 2 and first["rows"] == 30 and first["index"]["count"] == 30
    listing = set(s3.find("shardlight-test/out"))
    for name in ("embeddings/00000.parquet", "embeddings/00001.parquet", "errors/00000.parquet",
                 "index/meta.json", "run.json"):
        assert f"shardlight-test/out/{name}" in listing
    assert not any(p.endswith("_lease.json") for p in listing)

    again = pipeline(cfg.model_dump())
    assert again["processed"] == 0 and again["skipped"] == 2 and again["rows"] == 30

    searcher = Searcher("s3://shardlight-test/out")
    key = searcher.keys[3]
    assert searcher.search(key=key, k=1)[0].key == key
    assert len(searcher.search(text="a green star", k=5)) == 5
