"""A corpus of hostile image urls refused by the media policy (gateway.media_policy), each with a
MediaError that names what was wrong (the HTTP layer answers these with 400 in OpenAI's error shape):
the address classifier (`is_public`), the per-hop check (`AddressPolicy.checked_address`, which resolves
through `socket.getaddrinfo`) and the allow-list.

Names resolve through a fake DNS table, and any connect beyond loopback fails the test
(tests/media_network.py).
"""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig, MediaConfig
from gateway.media_policy import MediaError, is_public
from tests.media_network import PUBLIC_V4, case, check, found, offline_network


@pytest.fixture(autouse=True)
def network(monkeypatch, request):
    yield from offline_network(monkeypatch, request)


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
