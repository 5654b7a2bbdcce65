import asyncio
import http.server
import threading
import time
from contextlib import contextmanager

import pytest

from gateway.config import MediaConfig
from gateway.media import MediaFetcher
from gateway.media_policy import MediaError, is_public
from tests.helpers import data_url, make_image

PNG = make_image(20, 10, seed=0)


@contextmanager
def http_server(routes):
    """routes: path -> (status, headers, body, delay_s)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body, delay = routes.get(self.path, (404, {}, b"", 0))
            time.sleep(delay)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v.format(port=self.server.server_address[1]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda *args: None  # clients that time out close early; not a failure
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def fetch(config, url):
    async def go():
        fetcher = MediaFetcher(config)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "address,public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 wrapping 127.0.0.1
        ("2001:0:4136:e378::1", False),  # teredo
        ("fec0::1", False),  # site-local
        ("0.0.0.0", False),
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
    ],
)
def test_address_classification(address, public):
    assert is_public(address) is public


def test_data_urls():
    assert fetch(MediaConfig(), data_url(PNG)) == PNG
    with pytest.raises(MediaError, match="not valid base64"):
        fetch(MediaConfig(), "data:image/png;base64,@@@")
    with pytest.raises(MediaError, match="not an image"):
        fetch(MediaConfig(), "data:text/html;base64,PGh0bWw+")
    with pytest.raises(MediaError, match="byte cap"):
        fetch(MediaConfig(max_image_bytes=10), data_url(PNG))


def test_loopback_is_refused_unless_allowed():
    with http_server({"/a.png": (200, {}, PNG, 0)}) as base:
        with pytest.raises(MediaError, match="non-public address 127.0.0.1"):
            fetch(MediaConfig(), f"{base}/a.png")
        with pytest.raises(MediaError, match="non-public"):
            fetch(MediaConfig(), base.replace("127.0.0.1", "localhost") + "/a.png")
        assert fetch(MediaConfig(allow_private_urls=True), f"{base}/a.png") == PNG


def test_redirects_are_rechecked():
    routes = {
        "/hop": (302, {"Location": "http://localhost:{port}/a.png"}, b"", 0),
        "/a.png": (200, {}, PNG, 0),
        "/loop": (302, {"Location": "/loop"}, b"", 0),
    }
    with http_server(routes) as base:
        port = base.rsplit(":", 1)[1]
        config = MediaConfig(allow_private_urls=True, allowed_domains=[f"127.0.0.1:{port}"])
        with pytest.raises(MediaError, match="'localhost' is not in the allowed domains"):
            fetch(config, f"{base}/hop")
        assert fetch(MediaConfig(allow_private_urls=True), f"{base}/hop") == PNG
        with pytest.raises(MediaError, match="redirected more than"):
            fetch(MediaConfig(allow_private_urls=True), f"{base}/loop")


def test_byte_cap_status_and_timeout():
    routes = {"/big": (200, {}, b"x" * 5000, 0), "/slow": (200, {}, PNG, 3), "/gone": (410, {}, b"", 0)}
    with http_server(routes) as base:
        with pytest.raises(MediaError, match="over the 1000 byte cap"):
            fetch(MediaConfig(allow_private_urls=True, max_image_bytes=1000), f"{base}/big")
        with pytest.raises(MediaError, match="HTTP 410"):
            fetch(MediaConfig(allow_private_urls=True), f"{base}/gone")
        # the whole fetch is cut at its time limit (the server would answer after 3 s), and says so
        with pytest.raises(MediaError, match=r"timed out after 0\.5s"):
            fetch(MediaConfig(allow_private_urls=True, fetch_timeout_s=0.5), f"{base}/slow")


def test_local_files_only_inside_the_allowed_folder(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(MediaError, match="local image files are disabled"):
        fetch(MediaConfig(), f"file://{allowed / 'a.png'}")
    config = MediaConfig(allowed_local_media_path=str(allowed))
    assert fetch(config, f"file://{allowed / 'a.png'}") == PNG
    assert fetch(config, str(allowed / "a.png")) == PNG
    for escape in [f"file://{allowed}/../secret.png", f"file://{allowed / 'link.png'}", "/etc/passwd"]:
        with pytest.raises(MediaError, match="outside the allowed folder"):
            fetch(config, escape)
    with pytest.raises(MediaError, match="not supported"):
        fetch(config, "ftp://example.com/a.png")


def test_malformed_urls_are_media_errors():
    for url in [
        "http://[::1/x.png",
        "http://example.com:99999/x.png",
        "http://" + "a" * 300 + ".com/x",
        "file:///tmp/a\x00b",
    ]:
        with pytest.raises(MediaError):
            fetch(MediaConfig(allowed_local_media_path="/tmp"), url)


def test_the_checked_address_is_the_one_connected_to(monkeypatch):
    """No second DNS lookup after the check (DNS rebinding): the request goes to the checked IP,
    with the original Host header."""
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen["host"] = self.headers["Host"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    lookups = []

    async def fake_getaddrinfo(self, host, *args, **kwargs):
        lookups.append(host)
        return [(2, 1, 6, "", ("127.0.0.1", port))]

    import gateway.media_policy

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(gateway.media_policy, "is_public", lambda address: True)  # pretend loopback is public
    try:
        assert fetch(MediaConfig(), f"http://images.example:{port}/a.png") == PNG
    finally:
        server.shutdown()
    assert lookups == ["images.example"]  # resolved once, by the policy check
    assert seen["host"] == f"images.example:{port}"
