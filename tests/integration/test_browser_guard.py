"""A web page in a browser on the server's machine cannot drive the server (outside attack rt27 F2).

By default the server listens on loopback without tokens: every program of the machine reaches it, a browser
too, and a browser runs any site's scripts. A page could unload a model with a body-less cross-site POST (a
CORS "simple request", sent without asking), and a page whose host name was made to resolve to 127.0.0.1 (DNS
rebinding) could use the whole API as a local client. Cross-site requests that change or compute something
are refused (403), and a server on loopback answers loopback host names only, unless ``--allowed-hosts``
says otherwise.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import models
from onnxserve.core.manager import Catalog
from onnxserve.server.exposure import answered_hosts
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("guarded")
    models.write_version(repo, "m", 1, models.offset_model(1.0))
    return repo


def _serve(repository: Path, **settings: Any) -> RunningServer:
    catalog = Catalog(repository=repository)
    chosen = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("m",), **settings
    )
    return start_in_background(catalog.read(), chosen, catalog)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    running = _serve(repository)
    yield running
    running.stop()


def _attacker_site(page: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Another web site on this machine (another port: another origin), serving ``page`` at /."""

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    return site, f"http://127.0.0.1:{site.server_address[1]}/"


@pytest.mark.browser
def test_a_page_of_another_site_cannot_unload_a_model(server: RunningServer, chromium_executable: str) -> None:
    from playwright.sync_api import sync_playwright

    target = f"{server.http_url}/v2/repository/models/m/unload"
    page = f"""<!doctype html><script>
      window.done = fetch({target!r}, {{method: "POST", mode: "no-cors"}})
        .then(() => "sent", (e) => "failed: " + e);
    </script>"""
    site, url = _attacker_site(page)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
            try:
                tab = browser.new_page()
                tab.goto(url)
                assert tab.evaluate("window.done") == "sent"  # the browser did send it (the page reads nothing)
            finally:
                browser.close()
    finally:
        site.shutdown()
        site.server_close()
    # before: 404, the page had unloaded the model
    assert httpx.get(f"{server.http_url}/v2/models/m/ready", timeout=30).status_code == 200


def test_cross_site_requests_are_refused_and_same_site_ones_served(server: RunningServer) -> None:
    index = f"{server.http_url}/v2/repository/index"
    refused = httpx.post(index, headers={"Origin": "http://attacker.example"}, timeout=30)
    assert refused.status_code == 403, refused.text
    assert "cross-site request refused" in refused.json()["error"]
    assert httpx.post(index, headers={"Origin": "null"}, timeout=30).status_code == 403  # a sandboxed page
    other_scheme = server.http_url.replace("http://", "https://")  # another origin (rt28)
    assert httpx.post(index, headers={"Origin": other_scheme}, timeout=30).status_code == 403
    twice = [("Origin", server.http_url), ("Origin", "http://attacker.example")]
    assert httpx.post(index, headers=twice, timeout=30).status_code == 403
    own = httpx.post(index, headers={"Origin": server.http_url}, timeout=30)  # the server's own pages
    assert own.status_code == 200, own.text
    assert httpx.post(index, timeout=30).status_code == 200  # a client that is not a browser
    # reading is left to browsers' own rules (no CORS headers: a cross-site page cannot read the answer)
    assert httpx.get(f"{server.http_url}/v2/models/m", headers={"Origin": "http://a.example"}).status_code == 200


def test_host_names_that_are_not_loopback_are_refused_on_loopback(server: RunningServer, repository: Path) -> None:
    port = server.http_url.rsplit(":", 1)[1]
    infer = f"{server.http_url}/v2/models/m/infer"
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}
    rebound = httpx.post(infer, json=body, headers={"Host": f"attacker.example:{port}"}, timeout=30)
    assert rebound.status_code == 403, rebound.text  # before: 200, the answer readable by the rebound page
    assert "--allowed-hosts" in rebound.json()["error"]
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST.", f"[::ffff:127.0.0.1]:{port}", "0.0.0.0"):
        assert httpx.post(infer, json=body, headers={"Host": name}, timeout=30).status_code == 200, name
    # malformed values no browser sends, read as loopback before (outside attack rt28)
    for name in ("[::1]evil.com", f"localhost:{port}@evil.com", "127.0.0.1:evil.com"):
        assert httpx.post(infer, json=body, headers={"Host": name}, timeout=30).status_code == 403, name
    opened = _serve(repository, allowed_hosts="*")
    try:
        answer = httpx.post(
            f"{opened.http_url}/v2/models/m/infer", json=body, headers={"Host": "models.internal"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
    finally:
        opened.stop()


def test_allowed_hosts_names_the_host_names_answered() -> None:
    named = answered_hosts(ServerSettings(allowed_hosts="models.internal, api.example:8000"))
    assert named is not None
    assert named("models.internal")
    assert named("api.example")
    assert not named("localhost")  # named ones only
    assert answered_hosts(ServerSettings(allowed_hosts="*")) is None
    assert answered_hosts(ServerSettings(host="0.0.0.0")) is None  # reachable from elsewhere: any name
    assert answered_hosts(ServerSettings(forwarded_allow_ips="127.0.0.1")) is None  # a proxy's clients' names
    loopback = answered_hosts(ServerSettings())
    assert loopback is not None
    assert loopback("localhost")
    assert not loopback("attacker.example")
