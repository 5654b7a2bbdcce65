"""A corpus of hostile image urls refused by the fetcher (gateway.media): schemes and url shapes, local
files, and redirects re-checked at every hop (a loopback test server), each with a MediaError that names
what was wrong (the HTTP layer answers these with 400 in OpenAI's error shape). The destinations the
policy refuses are tests/unit/test_media_policy.py's corpus; hostile image bytes, test_hostile_images.py's.

No test here connects to anything but loopback (tests/media_network.py: a fake DNS table, and any other
connect fails the test).
"""

from __future__ import annotations

import http.server
import threading
from contextlib import contextmanager

import pytest

import gateway.media_policy
from gateway.config import MediaConfig
from gateway.media_policy import MediaError
from tests.helpers import data_url, make_image
from tests.media_network import PNG, case, fetch, found, offline_network


@pytest.fixture(autouse=True)
def network(monkeypatch, request):
    yield from offline_network(monkeypatch, request)


# ---- schemes and url shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,reason",
    [
        ("ftp://images.example/a.png", "scheme 'ftp' is not supported"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher' is not supported"),
        ("dict://127.0.0.1:11211/stat", "scheme 'dict' is not supported"),
        ("javascript:alert(1)", "scheme 'javascript' is not supported"),
        ("jar:http://images.example/a.jar!/a.png", "scheme 'jar' is not supported"),
        ("ldap://127.0.0.1/", "scheme 'ldap' is not supported"),
        ("images.example/a.png", r"scheme '\(none\)' is not supported"),
        case("//127.0.0.1/a.png", r"scheme '\(none\)' is not supported", fix="url-shape"),
        ("", "image url is empty"),
        ("http:///a.png", "has no host"),
        case("http://images.example/" + "a" * 10_000, "over the 8192-character limit", fix="url-shape"),
        ("http://[::1/a.png", "malformed"),
        ("http://images.example:99999/a.png", "malformed"),
        ("http://images.example:80:81/a.png", "malformed"),
        case("http://" + "a" * 300 + ".example/a.png", "not a valid host name", fix="host-names"),
        ("data:text/html;base64,PGh0bWw+", "media type 'text/html' is not an image"),
        ("data:application/zip;base64,UEsDBA==", "media type 'application/zip' is not an image"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        case("data:image/png;base64x,iVBORw0KGgo=", "must be base64-encoded", fix="url-shape"),
        ("data:image/png;charset=base64,iVBORw0KGgo=", "must be base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,iVBO Rw0K", "not valid base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64," + "A" * 2000, "over the 1000 byte cap"),
    ],
)
def test_urls_refused_by_shape_or_scheme(url, reason, network):
    with pytest.raises(MediaError, match=reason):
        fetch(url, MediaConfig(max_image_bytes=1000))
    assert network.lookups == []


def test_overlong_data_urls_are_capped_by_bytes_not_by_length():
    big = make_image(300, 300, seed=3)
    assert fetch(data_url(big)) == big


@pytest.fixture
def media_folder(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    (allowed / "dirlink").symlink_to(tmp_path)
    (allowed / "inner.png").symlink_to(allowed / "a.png")
    return allowed


@pytest.mark.parametrize(
    "url,reason",
    [
        ("file://{root}/../secret.png", "outside the allowed folder"),
        ("file://{root}/sub/../../secret.png", "outside the allowed folder"),
        ("file://{root}/%2e%2e/secret.png", "outside the allowed folder"),
        ("file://{root}/link.png", "outside the allowed folder"),
        ("file://{root}/dirlink/secret.png", "outside the allowed folder"),
        ("file:///etc/passwd", "outside the allowed folder"),
        ("/etc/passwd", "outside the allowed folder"),
        ("file://{root}/missing.png", "does not exist"),
        ("file://{root}/sub", "does not exist"),
        case("file://images.example{root}/a.png", "names a host", fix="url-shape"),
        case("file:a.png", "absolute path", fix="url-shape"),
    ],
)
def test_local_files_outside_the_folder_are_refused(media_folder, url, reason):
    config = MediaConfig(allowed_local_media_path=str(media_folder))
    with pytest.raises(MediaError, match=reason):
        fetch(url.format(root=media_folder), config)


def test_local_files_inside_the_folder_are_read(media_folder):
    config = MediaConfig(allowed_local_media_path=str(media_folder))
    assert fetch(f"file://{media_folder}/inner.png", config) == PNG
    assert fetch(f"file://localhost{media_folder}/a.png", config) == PNG
    assert fetch(f"file://{media_folder}/sub/../a.png", config) == PNG


def test_local_files_are_off_by_default(media_folder):
    with pytest.raises(MediaError, match="local image files are disabled"):
        fetch(f"file://{media_folder}/a.png")


# ---- redirects, re-checked at every hop (a loopback server) --------------------------------------------


@contextmanager
def http_server(routes):
    """routes: path -> (status, headers); headers may use {port} and {other} (a second server's port)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.hits.append(self.path)
            status, headers = routes.get(self.path, (404, {}))
            body = PNG if status == 200 else b""
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v.format(port=self.server.server_address[1], other=other_port))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    other_port = servers[1].server_address[1]
    for server in servers:
        server.hits = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{servers[0].server_address[1]}", servers
    finally:
        for server in servers:
            server.shutdown()


REDIRECTS = {
    "/a.png": (200, {}),
    "/same": (302, {"Location": "/a.png"}),
    "/other-port": (302, {"Location": "http://127.0.0.1:{other}/a.png"}),
    "/loop": (302, {"Location": "/loop"}),
    "/to-localhost": (302, {"Location": "http://localhost:{port}/a.png"}),
    "/to-v6": (307, {"Location": "http://[::1]:{port}/a.png"}),
    "/to-127.0.0.2": (301, {"Location": "http://0x7f000002:{port}/a.png"}),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}),
    "/to-userinfo": (302, {"Location": "http://images.example@127.0.0.2:{port}/a.png"}),
    "/to-file": (302, {"Location": "file:///etc/passwd"}),
    "/to-gopher": (302, {"Location": "gopher://127.0.0.1:6379/_INFO"}),
    "/to-data": (302, {"Location": "data:image/png;base64,iVBORw0KGgo="}),
    "/no-location": (302, {}),
}


@pytest.fixture
def loopback_is_public(monkeypatch):
    """127.0.0.1 (the test server) stands in for a public host; every other address keeps its class."""
    real = gateway.media_policy.is_public
    monkeypatch.setattr(
        gateway.media_policy, "is_public", lambda address: address == "127.0.0.1" or real(address)
    )


@pytest.mark.parametrize(
    "path,reason",
    [
        ("/to-localhost", "loopback|non-public address"),
        ("/to-v6", "non-public address ::1"),
        ("/to-127.0.0.2", "non-public address 127.0.0.2"),
        ("/to-metadata", "non-public address 169.254.169.254"),
        case("/to-userinfo", "user name or password", fix="userinfo"),
        case("/to-file", "redirected to a 'file' url", fix="redirect-scheme"),
        case("/to-gopher", "redirected to a 'gopher' url", fix="redirect-scheme"),
        case("/to-data", "redirected to a 'data' url", fix="redirect-scheme"),
        ("/no-location", "without a Location"),
        ("/loop", "redirected more than 5 times"),
    ],
)
def test_each_redirect_hop_is_rechecked(loopback_is_public, path, reason):
    with http_server(REDIRECTS) as (base, servers):
        assert fetch(f"{base}/same") == PNG  # the server counts as public here
        servers[0].hits.clear()
        with pytest.raises(MediaError, match=reason):
            fetch(base + path)
        assert "/a.png" not in servers[0].hits  # the refused hop was never fetched


@found("ports")
def test_a_redirect_to_another_port_of_an_allowed_host_is_refused():
    with http_server(REDIRECTS) as (base, servers):
        port = servers[0].server_address[1]
        other = servers[1].server_address[1]
        assert fetch(f"{base}/other-port", MediaConfig(allow_private_urls=True)) == PNG  # no allow-list
        config = MediaConfig(allow_private_urls=True, allowed_domains=[f"127.0.0.1:{port}"])
        assert fetch(f"{base}/same", config) == PNG
        servers[1].hits.clear()
        with pytest.raises(MediaError, match=f"port {other} of '127.0.0.1' is not in the allowed domains"):
            fetch(f"{base}/other-port", config)
        assert servers[1].hits == []
        both = MediaConfig(
            allow_private_urls=True, allowed_domains=[f"127.0.0.1:{port}", f"127.0.0.1:{other}"]
        )
        assert fetch(f"{base}/other-port", both) == PNG


def test_too_many_redirects():
    with http_server(REDIRECTS) as (base, _):
        with pytest.raises(MediaError, match="redirected more than 0 times"):
            fetch(f"{base}/same", MediaConfig(allow_private_urls=True, max_redirects=0))
        with pytest.raises(MediaError, match="redirected more than 2 times"):
            fetch(f"{base}/loop", MediaConfig(allow_private_urls=True, max_redirects=2))
