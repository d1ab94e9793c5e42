"""The egress proxy's policy functions: names, wildcards, IP literals, special addresses."""

from __future__ import annotations

import pytest

from adapters.sandbox.egress import Denied, address_refusal, domain_allowed, normalize_host

ALLOW = ["x.com", "*.wild.example.org"]


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("x.com", True),
        ("X.COM", True),
        ("x.com.", True),
        ("a.x.com", False),  # exact entry: no subdomains
        ("evilx.com", False),
        ("x.com.evil.com", False),
        ("wild.example.org", False),  # a wildcard does not match its own apex
        ("a.wild.example.org", True),
        ("a.b.wild.example.org", True),
        ("evilwild.example.org", False),
        ("a.wild.example.org.evil.com", False),
        ("xn--wild-9ta.example.org", False),
    ],
)
def test_wildcards(host: str, allowed: bool) -> None:
    assert domain_allowed(normalize_host(host), ALLOW) is allowed


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.0x0.0x0.0x1", "[::1]", "::ffff:127.0.0.1",
     "169.254.169.254", "10.0.0.1", "1.2.3.4."],
)
def test_ip_literals_refused_in_every_spelling(host: str) -> None:
    with pytest.raises(Denied, match="IP literal"):
        normalize_host(host)


@pytest.mark.parametrize("host", ["exаmple.com", "", "a..b", "-a.com", "a_b.com", "localhost", "x" * 300])
def test_malformed_names_refused(host: str) -> None:
    with pytest.raises(Denied):
        normalize_host(host)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
     "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "255.255.255.255"],
)
def test_special_addresses_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "1.1.1.1"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


def test_config_refuses_overbroad_wildcards() -> None:
    from conveyor.config import SandboxPolicy

    for bad in ["*", "*.com"]:
        with pytest.raises(ValueError):
            SandboxPolicy(allow_domains=[bad])
