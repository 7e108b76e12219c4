"""Every expected failure, through the real console script: exit status 2 and one line on stderr that says
what is wrong (and, where there is one, what to do), found before any Prefect server or Ray starts."""

from __future__ import annotations

import time

import pytest
import requests

from index.build import build_index
from shardlight.core.config import CONFIG_DIR
from tests.index_helpers import clustered, running_server, write_shard
from tests.test_cli import assert_one_line_error, run_cli

DEMO = str(CONFIG_DIR / "demo.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An output with a 64-vector Flat index (labels 'red circle' and 'blue square'), shards, odd files."""
    root = tmp_path_factory.mktemp("errors")
    write_shard(root / "out", "00000", clustered(64, dim=16))
    build_index(str(root / "out"), "Flat")
    (root / "data").mkdir()
    (root / "data" / "00000.tar").write_bytes(b"")
    (root / "a-file.txt").write_text("not a folder, not an image\n")
    (root / "typo.yaml").write_text("clip:\n  model: shapes-clip\nindex:\n  factroy: Flat\n")
    (root / "broken.yaml").write_text("clip:\n  model: shapes-clip\n labels: [\n")
    return root


# (case, CLI arguments with {root} standing for the fixture folder, what the one line must say)
CASES = [
    ("output is a file", ["run", DEMO, "-i", "{root}/data", "-o", "{root}/a-file.txt"], "is a file, not a folder"),
    ("input pattern matches nothing", ["run", DEMO, "-i", "{root}/data/*.tgz", "-o", "{root}/o"],
     "no input shards match"),
    ("config key typo", ["run", "{root}/typo.yaml", "-i", "{root}/data", "-o", "{root}/o"],
     "unknown key 'index.factroy' (did you mean 'index.factory'?)"),
    ("YAML syntax error", ["run", "{root}/broken.yaml", "-i", "{root}/data", "-o", "{root}/o"],
     "not valid YAML at line 3"),
    ("query image missing", ["query", "{root}/out", "--image", "{root}/nope.jpg"], "query image {root}/nope.jpg not found"),
    ("query image is a folder", ["query", "{root}/out", "--image", "{root}/data"], "is a folder, not an image file"),
    ("query image is not an image", ["query", "{root}/out", "--image", "{root}/a-file.txt"],
     "cannot decode query image {root}/a-file.txt: not an image format"),
    ("unknown label", ["query", "{root}/out", "--key", "00000_000000", "--label", "red circel"],
     "closest: 'red circle'"),
    ("query a folder that does not exist", ["query", "{root}/no-such-out", "a red circle"], "does not exist"),
    ("IVF lists need more points", ["index", "{root}/out", "--factory", "IVF1024,Flat"],
     "needs at least 1024 vectors to train (39936 recommended) and there are 64"),
    ("invalid cron", ["deploy", DEMO, "--name", "x", "--cron", "every hour", "-i", "{root}/data", "-o", "{root}/o"],
     "is not a cron schedule"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_expected_failure_is_one_line_with_exit_2(root, args, expected):
    start = time.monotonic()
    result = run_cli(*(a.format(root=root) for a in args))
    assert_one_line_error(result, expected.format(root=root))
    assert "prefect" not in result.stderr.lower() and "Token authentication" not in result.stderr
    assert time.monotonic() - start < 60  # found up front, not after a server started (a bound, not a timing)


@pytest.mark.timeout(120)
def test_unknown_label_over_http_names_the_closest(root):
    from index.service.http_common import ServerSettings
    from index.service.server import create_app

    with running_server(create_app(str(root / "out"), ServerSettings(), warm=False)) as url:
        r = requests.get(f"{url}/search", params={"key": "00000_000000", "label": "blue sqare"}, timeout=60)
    assert r.status_code == 400 and "closest: 'blue square'" in r.json()["detail"]


def test_a_refused_ray_connection_hints_at_token_authentication(monkeypatch):
    import ray

    from shardlight.core.config import RaySpec
    from shardlight.core.errors import ClusterError
    from workers import pool

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to GCS at address 10.0.0.1:6379 within 5 seconds.")

    monkeypatch.setattr(ray, "init", lambda address, **kw: refuse(**kw))
    with pytest.raises(ClusterError) as err:
        pool.connect(RaySpec(address="10.0.0.1:6379"))
    assert "RAY_AUTH_MODE=token" in str(err.value) and "docs/cluster.md" in str(err.value)
    assert "\n" not in str(err.value)
