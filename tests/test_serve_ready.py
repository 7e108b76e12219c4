"""`shardlight serve` says ready (/health 200) only after the CLIP model is loaded and has run once."""

import threading

import numpy as np
import pytest
import requests

from index.build import build_index
from index.search import Searcher
from tests.index_helpers import clustered, running_server, write_shard


class SlowSearcher(Searcher):
    """A searcher whose model takes until `release` is set to load."""

    release = threading.Event()

    def embed_text(self, text):
        self.release.wait(60)
        return np.ones(16, np.float32) / 4.0


@pytest.mark.timeout(120)
def test_health_is_503_until_the_model_is_warm(tmp_path):
    from index.service.http_common import ServerSettings
    from index.service.server import create_app

    write_shard(tmp_path / "out", "00000", clustered(16, dim=16))
    build_index(str(tmp_path / "out"), "Flat")
    searcher = SlowSearcher(tmp_path / "out")
    with running_server(create_app(str(tmp_path / "out"), ServerSettings(), searcher, warm=True)) as url:
        warming = requests.get(f"{url}/health", timeout=30)
        assert warming.status_code == 503 and warming.json()["status"] == "warming up"
        searcher.release.set()
        for _ in range(100):
            ready = requests.get(f"{url}/health", timeout=30)
            if ready.status_code == 200:
                break
            threading.Event().wait(0.1)
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
