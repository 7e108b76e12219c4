"""The web page, driven in headless Chromium over the DevTools protocol: type a query, see thumbnails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from index_helpers import make_real_run, running_server  # noqa: E402

from index.service.http_common import ServerSettings  # noqa: E402
from index.service.server import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


class Browser:
    """Just enough of the DevTools protocol: evaluate JavaScript in one page."""

    def __init__(self, profile: str):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def _devtools_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError("chromium did not report its DevTools port")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def site_and_out(tmp_path_factory):
    out = make_real_run(tmp_path_factory.mktemp("index-page"), shards=1, samples_per_shard=24)
    with running_server(create_app(str(out), ServerSettings(), warm=False)) as url:
        yield url, out


@pytest.fixture(scope="module")
def site(site_and_out):
    return site_and_out[0]


def image_bytes_of(searcher, key: str) -> bytes:
    """The key's image member, read from its source tar with tarfile."""
    import tarfile

    from shardlight.core.layout import embeddings_path, read_stats

    shard = searcher.shards[searcher.id_of_key(key)]
    with tarfile.open(read_stats(embeddings_path(searcher.out, shard))["url"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + ".") and m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


@pytest.fixture
def browser(tmp_path):
    b = Browser(str(tmp_path / "profile"))
    yield b
    b.close()


LOADED_THUMBS = ("[...document.querySelectorAll('#results .card img.thumb')]"
                 ".filter(i => i.complete && i.naturalWidth > 0).length")


@pytest.mark.timeout(180)
def test_text_search_shows_thumbnails_and_more_like_this(site, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=site + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('q')")
    browser.js("document.getElementById('q').value = 'a red circle'; document.getElementById('go').click(); true")
    cards = browser.wait_for("document.querySelectorAll('#results .card').length")
    assert cards == 24  # the page asks for 24 by default; the index holds 24
    assert browser.wait_for(f"{LOADED_THUMBS} === 24", timeout=120)  # every thumbnail, not just one
    status = browser.js("document.getElementById('status').textContent")
    assert "results for" in status and "a red circle" in status
    first = browser.js("document.querySelector('#results .card').dataset.key")
    caption = browser.js("document.querySelector('#results .card .caption').textContent")
    assert first and caption
    # clicking a result searches for more like it: that image comes back first, with score 1
    second = browser.js("document.querySelectorAll('#results .card')[1].dataset.key")
    browser.js("document.querySelectorAll('#results .card')[1].click(); true")
    browser.wait_for(f"document.getElementById('status').textContent.includes('results for more like {second}')")
    assert browser.js("document.querySelector('#results .card').dataset.key") == second
    assert browser.js("document.querySelector('#results .card .score').textContent") == "1.000"
    assert browser.wait_for(f"{LOADED_THUMBS} === 24", timeout=120)


@pytest.mark.timeout(180)
def test_dropping_an_image_file_searches_by_it(site_and_out, browser, tmp_path):
    """A real drag-and-drop of a file onto the page (DevTools Input.dispatchDragEvent): that image comes first."""
    from index.search import Searcher

    url, out = site_and_out
    searcher = Searcher(out)
    key = searcher.keys[5]
    image = tmp_path / "dropped.jpg"
    image.write_bytes(image_bytes_of(searcher, key))
    browser.call("Page.enable")
    browser.call("Page.navigate", url=url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('q')")
    data = {"items": [], "files": [str(image)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        browser.call("Input.dispatchDragEvent", type=kind, x=200, y=200, data=data)
    browser.wait_for("document.getElementById('status').textContent.includes('results for image dropped.jpg')")
    assert browser.js("document.querySelector('#results .card').dataset.key") == key
    assert browser.js("document.querySelector('#results .card .score').textContent") == "1.000"
    assert browser.wait_for(f"{LOADED_THUMBS} === 24", timeout=120)
