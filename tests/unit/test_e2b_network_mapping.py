"""E2B's egress options as Corral policies (server/e2b/network.py): the table, what is refused, and back."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import InvalidRequest
from corral.netpolicy import NetworkPolicy
from corral.server.e2b.network import ALL_TRAFFIC, corral_policy, e2b_network

ALL = ALL_TRAFFIC


@pytest.mark.parametrize(
    ("network", "allow_internet_access", "by_default", "expected"),
    [
        (None, None, False, "none"),  # no choice: the server's default
        (None, True, False, "none"),  # SDKs up to 2.45 send true on every create: no choice either
        (None, None, True, "internet"),
        (None, True, True, "internet"),
        ({"allowPublicTraffic": False}, None, True, "internet"),  # not an egress choice
        (None, False, True, "none"),
        ({"denyOut": [ALL]}, None, True, "none"),
        ({"denyOut": [ALL], "allowOut": ["pypi.org", "198.51.100.0/24"]}, None, False,
         {"allow_out": ["pypi.org", "198.51.100.0/24"], "deny_out": []}),
        ({"allowOut": ["pypi.org"]}, False, True, {"allow_out": ["pypi.org"], "deny_out": []}),
        ({"allowOut": [], "denyOut": [ALL]}, None, True, {"allow_out": [], "deny_out": []}),
        ({"denyOut": ["198.51.100.0/24", "::/0"]}, None, False, "none"),  # ::/0 is all traffic too
        ({"denyOut": ["198.51.100.0/24"]}, None, False, {"deny_out": ["198.51.100.0/24"]}),
        ({"denyOut": []}, None, False, "internet"),  # an explicit empty deny-list: everything
        ({"allowOut": ["pypi.org"]}, None, False, "internet"),  # E2B: allowOut only carves out of denyOut
        ({"allowOut": ["203.0.113.9"], "denyOut": ["198.51.100.0/24"]}, None, False,
         {"deny_out": ["198.51.100.0/24"]}),  # no overlap: the allow entry changes nothing
    ],
)  # fmt: skip
def test_the_mapping(network: Any, allow_internet_access: Any, by_default: bool, expected: Any) -> None:
    got = corral_policy(network, allow_internet_access, internet_by_default=by_default)
    assert got == expected
    NetworkPolicy.parse(got)  # and Corral accepts what it maps to


def test_allow_internet_access_true_is_a_choice_on_update_only() -> None:
    assert corral_policy(None, True, internet_by_default=False) == "none"
    assert corral_policy(None, True, internet_by_default=False, internet_is_a_choice=True) == "internet"
    assert corral_policy(None, None, internet_by_default=False, internet_is_a_choice=True) == "none"


@pytest.mark.parametrize(
    ("network", "names"),
    [
        ({"egressProxy": {"address": "p.test:1080"}}, "network.egressProxy"),
        ({"rules": {"api.test": [{"transform": {}}]}}, "network.rules"),
        ({"dnsServers": ["192.0.2.53"]}, "network.dnsServers"),
        ({"maskRequestHost": "${PORT}-x.example.com"}, "network.maskRequestHost"),
        ({"httpsPorts": [3000]}, "network.httpsPorts"),
        ({"allowOut": ["198.51.100.7"], "denyOut": ["198.51.100.0/24"]}, "exception to network.denyOut"),
        ({"allowOut": "pypi.org"}, "must be a list"),
        ({"denyOut": ["not a rule!"]}, "neither a host name"),
    ],
)
def test_what_cannot_be_done_is_refused_by_name(network: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidRequest, match=names):
        corral_policy(network, None, internet_by_default=True)


def test_empty_options_are_no_options() -> None:
    assert corral_policy(
        {"dnsServers": [], "httpsPorts": [], "rules": {}}, None, internet_by_default=True
    ) == ("internet")


@pytest.mark.parametrize(
    ("wire", "internet", "network"),
    [
        ("none", False, {"denyOut": [ALL]}),
        ("internet", True, {}),
        ({"deny_out": ["198.51.100.0/24"]}, True, {"denyOut": ["198.51.100.0/24"]}),
        ({"allow_out": ["pypi.org"], "deny_out": []}, False, {"allowOut": ["pypi.org"], "denyOut": [ALL]}),
        ({"allow_out": [], "deny_out": [ALL]}, False, {"allowOut": [], "denyOut": [ALL]}),  # no doubled ALL
    ],
)
def test_reported_back_as_e2b_says_it(wire: Any, internet: bool, network: dict[str, Any]) -> None:
    assert e2b_network(wire, True) == (internet, {"allowPublicTraffic": True, **network})
