"""A corpus of hostile image urls and image bytes, each refused with a MediaError/InvalidInputError
that names what was wrong (the HTTP layer answers these with 400 in OpenAI's error shape).

No test here opens a connection to anything but loopback: an autouse fixture replaces the resolver
with a fake DNS table (no packet leaves the machine) and makes every socket connect to a
non-loopback address fail the test. The policy is tested on the address classifier (`is_public`),
the per-hop check (`AddressPolicy.checked_address`, which resolves through `socket.getaddrinfo`)
and, for redirects, a loopback test server.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import socket
import struct
import threading
import zlib
from contextlib import contextmanager

import pytest
from PIL import Image

import gateway.media_policy
from gateway.config import GatewayConfig, MediaConfig
from gateway.media import MediaFetcher
from gateway.media_policy import AddressPolicy, MediaError, is_public
from mmserve.errors import InvalidInputError
from mmserve.images import decode_image, probe_image
from tests.helpers import data_url, make_image

PNG = make_image(20, 10, seed=0)
PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"

# The fake DNS: name -> addresses. Names not here do not exist (NXDOMAIN).
FAKE_DNS = {
    "images.example": [PUBLIC_V4, PUBLIC_V6],
    "cdn.images.example": [PUBLIC_V4],
    "evilimages.example": [PUBLIC_V4],
    "images.example.evil": [PUBLIC_V4],
    "loopback.example": ["127.0.0.1"],
    "rebind.example": [PUBLIC_V4, "10.0.0.7"],  # one public and one private answer
    "metadata.example": ["169.254.169.254"],
    "v6loop.example": ["::1"],
    "xn--bcher-kva.example": ["127.0.0.1"],  # bücher.example
    "localhost": ["127.0.0.1", "::1"],
    "foo.localhost": [PUBLIC_V4],  # a resolver that does not special-case *.localhost
}
# Fixes the corpus found, not yet landed: their cases are expected to fail (strict xfail) until then.
PENDING_FIXES: set[str] = set()  # all landed; the tags stay as the record of what each case found


def found(fix: str):
    """Marks a case with the fix it found (an expected failure while that fix is pending)."""
    return pytest.mark.xfail(fix in PENDING_FIXES, reason=f"found a bug; fixed by {fix!r}", strict=True)


def case(*values, fix: str):
    return pytest.param(*values, marks=found(fix))


REAL_GETADDRINFO = socket.getaddrinfo
REAL_CONNECT = socket.socket.connect


class Network:
    def __init__(self):
        self.lookups: list[str] = []
        self.refused_connects: list[object] = []
        self.everything_public = False  # a resolver that answers every name, numeric spellings too


@pytest.fixture(autouse=True)
def network(monkeypatch, request):
    net = Network()

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, bytes):
            host = host.decode("ascii")
        try:  # a numeric host never needs DNS (AI_NUMERICHOST: no lookup is sent)
            infos = REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            if not net.everything_public:
                return infos
        except socket.gaierror:
            pass
        net.lookups.append(host)
        name = host.lower().rstrip(".")
        answers = [PUBLIC_V4] if net.everything_public else FAKE_DNS.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
            for a in answers
        ]

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            if not ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
                net.refused_connects.append(address)
                raise AssertionError(f"a test tried to connect to {address}")
        return REAL_CONNECT(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield net
    marker = request.node.get_closest_marker("xfail")
    if marker is None or not marker.args or not marker.args[0]:
        assert not net.refused_connects, f"connections attempted to {net.refused_connects}"


def run(coro_fn, config):
    async def go():
        fetcher = MediaFetcher(config)
        try:
            return await coro_fn(fetcher)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def check(url, config=None):
    """The per-hop policy check alone: the address the fetcher would connect to."""
    return asyncio.run(AddressPolicy(config or MediaConfig()).checked_address(url))


def fetch(url, config=None):
    return run(lambda f: f.fetch(url), config or MediaConfig())


# ---- the address classifier ---------------------------------------------------------------------

NON_PUBLIC_ADDRESSES = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "0:0:0:0:0:ffff:127.0.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "169.254.169.254",  # cloud metadata
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",  # site-local
    "fc00::1",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "198.18.0.1",  # benchmarking
    "192.0.0.170",
    "192.0.2.1",  # documentation
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",  # broadcast
    "240.0.0.1",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
]


@pytest.mark.parametrize("address", NON_PUBLIC_ADDRESSES)
def test_non_public_addresses(address):
    assert is_public(address) is False


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111"])
def test_public_addresses(address):
    assert is_public(address) is True


# ---- SSRF spellings of loopback / private / link-local, checked per hop -------------------------------

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1/a.png",
    "http://127.1/a.png",
    "http://0177.0.0.1/a.png",  # octal
    "http://0x7f.0.0.1/a.png",
    "http://0x7f000001/a.png",
    "http://2130706433/a.png",  # decimal
    "http://017700000001/a.png",  # octal, one part
    "http://127.000.000.001/a.png",
    case("http://127.0.0.1./a.png", fix="ports"),  # trailing dot
    "http://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://[::ffff:7f00:1]/a.png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]/a.png",
    "http://[::127.0.0.1]/a.png",
    "http://[2002:7f00:1::]/a.png",
    "HTTP://127.0.0.1:8080/a.png",
    "https://127.0.0.1:443/a.png",
]


@pytest.mark.parametrize("url", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused(url):
    with pytest.raises(MediaError, match="non-public address"):
        check(url)


@pytest.mark.parametrize(
    "url,address",
    [
        ("http://0.0.0.0/", "0.0.0.0"),
        ("http://0/", "0.0.0.0"),
        ("http://[::]/", "::"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://0xa9fea9fe/latest/meta-data/", "169.254.169.254"),
        ("http://[fe80::1]/", "fe80::1"),
        case("http://[fe80::1%25eth0]/", "fe80::1", fix="literals"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "2001:0:4136:e378:8000:63bf:3fff:fdd2"),
        ("http://10.1.2.3/", "10.1.2.3"),
        ("http://012.1.2.3/", "10.1.2.3"),
        ("http://172.16.0.1/", "172.16.0.1"),
        ("http://192.168.0.1/", "192.168.0.1"),
        ("http://100.64.0.1/", "100.64.0.1"),
        ("http://198.18.0.1/", "198.18.0.1"),
        ("http://224.0.0.1/", "224.0.0.1"),
        ("http://255.255.255.255/", "255.255.255.255"),
    ],
)
def test_private_link_local_and_special_addresses_are_refused(url, address):
    with pytest.raises(MediaError, match=f"non-public address {address}"):
        check(url)


@pytest.mark.parametrize(
    "url,address",
    [
        ("http://loopback.example/a.png", "127.0.0.1"),
        ("http://LOOPBACK.EXAMPLE./a.png", "127.0.0.1"),
        ("http://rebind.example/a.png", "10.0.0.7"),  # one private answer among public ones
        ("http://metadata.example/a.png", "169.254.169.254"),
        ("http://v6loop.example/a.png", "::1"),
        case("http://bücher.example/a.png", "127.0.0.1", fix="host-names"),  # IDN, resolved as its punycode
        ("http://xn--bcher-kva.example/a.png", "127.0.0.1"),
    ],
)
def test_names_that_resolve_to_non_public_addresses(url, address):
    with pytest.raises(MediaError, match=f"non-public address {address}"):
        check(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost/a.png",
        "http://localhost./a.png",
        "http://LOCALHOST/a.png",
        # RFC 6761: *.localhost is loopback, whatever DNS says
        case("http://foo.localhost/a.png", fix="host-names"),
        case("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/a.png", fix="host-names"),  # IDNA maps it to "localhost"
    ],
)
def test_localhost_names_are_refused(url):
    with pytest.raises(MediaError, match="loopback|non-public address"):
        check(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
@found("literals")
def test_ip_literals_are_classified_without_the_resolver(url, network):
    """Even a resolver that answers every name (numeric spellings too) with a public address does not
    decide for an IP literal: the policy parses the literal itself."""
    network.everything_public = True
    with pytest.raises(MediaError, match="non-public address"):
        check(url)
    assert network.lookups == []


@pytest.mark.parametrize(
    "url",
    [
        "http://%31%32%37.0.0.1/a.png",
        "http://%6c%6f%63%61%6c%68%6f%73%74/a.png",
        "http://images.example%2f@127.0.0.1/a.png".replace("@127.0.0.1", ""),
        "http://ima_ges!.example/a.png",
    ],
)
@found("host-names")
def test_hosts_with_invalid_characters_are_refused_before_any_lookup(url, network):
    with pytest.raises(MediaError, match="not a valid host name"):
        check(url)
    assert network.lookups == []


@pytest.mark.parametrize(
    "url", ["http://256.0.0.1/", "http://1.2.3.4.5/", "http://0x1g.1/", "http://127.0.0.0x100/"]
)
@found("literals")
def test_numeric_hosts_that_are_no_address_are_refused_before_any_lookup(url, network):
    with pytest.raises(MediaError, match="not a valid IPv4 address"):
        check(url)
    assert network.lookups == []


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example@127.0.0.1/a.png",
        "http://images.example:80@127.0.0.1/a.png",
        "http://images.example\\@127.0.0.1/a.png",
        "http://user:pass@images.example/a.png",
    ],
)
@found("userinfo")
def test_userinfo_is_refused(url):
    with pytest.raises(MediaError, match="user name or password"):
        check(url)


def test_unknown_names_are_media_errors():
    with pytest.raises(MediaError, match="'nxdomain.example' cannot be resolved"):
        check("http://nxdomain.example/a.png")


@pytest.mark.parametrize(
    "url,address",
    [
        ("http://images.example/a.png", PUBLIC_V4),
        ("https://IMAGES.example./a.png", PUBLIC_V4),
        ("http://8.8.8.8/a.png", "8.8.8.8"),
        ("http://0x08080808/a.png", "8.8.8.8"),
        ("http://[2606:4700::1111]/a.png", "2606:4700::1111"),
        case("http://[64:ff9b::808:808]/a.png", "64:ff9b::808:808", fix="nat64"),  # NAT64 of a public address
    ],
)
def test_public_destinations_pass_the_check(url, address):
    assert check(url) == address


# ---- the allow-list, with ports ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries,url",
    [
        (["images.example"], "http://images.example/a.png"),
        (["images.example"], "http://images.example:80/a.png"),
        (["images.example"], "https://images.example/a.png"),
        (["images.example"], "https://images.example:443/a.png"),
        (["images.example"], "https://cdn.images.example/a.png"),
        (["images.example"], "https://IMAGES.EXAMPLE./a.png"),
        (["Images.Example."], "https://images.example/a.png"),
        (["images.example:8443"], "https://images.example:8443/a.png"),
        (["images.example:8443", "images.example"], "https://images.example/a.png"),
        (["8.8.8.8:8080"], "http://8.8.8.8:8080/a.png"),
        (["[2606:4700::1111]:8443"], "https://[2606:4700::1111]:8443/a.png"),
    ],
)
@found("ports")
def test_allow_list_admits(entries, url):
    assert check(url, MediaConfig(allowed_domains=entries))


@pytest.mark.parametrize(
    "entries,url,reason",
    [
        (["images.example"], "http://images.example:8080/a.png", "port 8080"),
        (["images.example"], "https://images.example:80/a.png", "port 80"),  # https's default is 443
        (["images.example"], "http://images.example:443/a.png", "port 443"),
        (["images.example"], "http://images.example:0/a.png", "port 0"),
        (["images.example:8443"], "https://images.example/a.png", "port 443"),
        (["images.example:8443"], "https://images.example:9443/a.png", "port 9443"),
        (["images.example"], "http://evilimages.example/a.png", "not in the allowed domains"),
        (["images.example"], "http://images.example.evil/a.png", "not in the allowed domains"),
        case(["8.8.8.8"], "http://1.8.8.8.8/a.png", "not a valid IPv4 address", fix="literals"),
        (["images.example"], "http://2130706433/a.png", "not in the allowed domains"),
    ],
)
@found("ports")
def test_allow_list_refuses(entries, url, reason):
    with pytest.raises(MediaError, match=reason):
        check(url, MediaConfig(allowed_domains=entries))


@found("ports")
def test_allow_list_entries_are_normalised():
    config = MediaConfig(
        allowed_domains=["Images.Example.", "CDN.example:8443", "[2606:4700::1111]:443", "bücher.example"]
    )
    assert config.allowed_domains == [
        "images.example",
        "cdn.example:8443",
        "[2606:4700::1111]:443",
        "xn--bcher-kva.example",
    ]


@pytest.mark.parametrize(
    "entry",
    [
        "images.example:99999",
        "images.example:0",
        "images.example:abc",
        "http://images.example",
        "a/b",
        ":80",
        "[::1",
    ],
)
@found("ports")
def test_bad_allow_list_entries_are_refused_at_startup(entry):
    with pytest.raises(ValueError, match="allowed domain"):
        MediaConfig(allowed_domains=[entry])


@found("ports")
def test_the_allowed_domains_flag_says_ports(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("ALLOWED_MEDIA_DOMAINS", "images.example:8443, cdn.example")
    config = GatewayConfig.from_args(["--checkpoint", str(tiny_checkpoint)])
    assert config.media.allowed_domains == ["images.example:8443", "cdn.example"]
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "host[:port]" in help_text and "default port" in help_text


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


# ---- hostile image bytes ---------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk only (no pixel data): what a decompression bomb's header says."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 24), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says 'rotate 90° clockwise to display' (Orientation 6): shown 20x40."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # the stored left edge is red: the displayed top
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


JPEG = make_image(64, 48, seed=4, fmt="JPEG")
MAX_PIXELS = 40_000_000


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "image is empty"),
        (png_header(100_000, 100_000), "too many pixels"),
        (png_header(50_000, 50_000), "too many pixels"),
        (png_header(7000, 7000), "49000000 pixels, over the cap of 40000000"),
        (png_header(4000, 1), "4000x1; its aspect ratio is over 50:1"),
        (png_header(1, 4000), "1x4000; its aspect ratio is over 50:1"),
        (png_header(0, 10), "cannot be decoded"),
        (PNG[:20], "cannot be decoded"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "cannot be decoded"),
        (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "cannot be decoded"),
        (b"PK\x03\x04" + b"\x00" * 100, "cannot be decoded"),  # a zip named .png
        (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "cannot be decoded"),
        case(
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "not an accepted image format",
            fix="image-formats",
        ),
        (b"\x00" * 64, "cannot be decoded"),
        (b"GIF89a", "cannot be decoded"),
    ],
)
def test_hostile_bytes_fail_the_header_probe(data, reason):
    with pytest.raises(InvalidInputError, match=reason):
        probe_image(data, MAX_PIXELS)
    with pytest.raises(InvalidInputError, match=reason):
        decode_image(data, MAX_PIXELS)


@found("image-formats")
def test_eps_is_not_an_accepted_format():
    """PIL would hand EPS to Ghostscript; only the web's raster formats are opened."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
    with pytest.raises(InvalidInputError, match="not an accepted image format"):
        probe_image(eps, MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [PNG[: len(PNG) * 2 // 3], JPEG[: len(JPEG) // 2]],
    ids=["truncated-png", "truncated-jpeg"],
)
def test_truncated_images_pass_the_header_probe_but_fail_the_decode(data):
    probe_image(data, MAX_PIXELS)  # the header is intact (the gateway's check)
    with pytest.raises(InvalidInputError, match="cannot be decoded.*(truncated|broken)"):
        decode_image(data, MAX_PIXELS)  # the vision service's decode


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_decode_their_first_frame(fmt):
    data = animated(fmt)
    assert probe_image(data, MAX_PIXELS) == (32, 24)
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert image.getpixel((5, 5))[0] > 200 and image.getpixel((5, 5))[1] < 60  # red: frame 0


@pytest.mark.parametrize("size", [(1, 1), (50, 1), (1, 50)])
def test_tiny_and_boundary_shapes_are_accepted(size):
    data = make_image(*size, seed=5)
    assert probe_image(data, MAX_PIXELS) == size
    assert decode_image(data, MAX_PIXELS).size == size


def test_aspect_ratio_just_over_the_cap():
    with pytest.raises(InvalidInputError, match="51x1; its aspect ratio is over 50:1"):
        probe_image(make_image(51, 1, seed=6), MAX_PIXELS)


@found("exif")
def test_exif_rotation_is_applied_when_decoding():
    data = exif_rotated_jpeg()
    assert probe_image(data, MAX_PIXELS) in {(40, 20), (20, 40)}
    image = decode_image(data, MAX_PIXELS)
    assert image.size == (20, 40)  # as displayed
    assert image.getpixel((10, 2))[1] < 100  # red on top
    assert image.getpixel((10, 37))[1] > 200  # white below


def test_a_data_url_of_a_bomb_is_fetched_then_refused_by_the_probe():
    data = fetch(data_url(png_header(100_000, 100_000)))
    with pytest.raises(InvalidInputError, match="too many pixels"):
        probe_image(data, MAX_PIXELS)


def test_svg_data_url_passes_the_fetch_and_fails_the_probe():
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"
    data = fetch(data_url(svg, "image/svg+xml"))
    with pytest.raises(InvalidInputError, match="cannot be decoded"):
        probe_image(data, MAX_PIXELS)
