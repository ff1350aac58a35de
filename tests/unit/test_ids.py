"""Typed, prefixed ids: the format, validation and its messages, and uniqueness."""

from __future__ import annotations

import re
from typing import Any

import pytest

from corral.errors import InvalidRequest
from corral.ids import KeyId, ProcessId, SandboxId, TenantId, new_request_id

ID_TYPES = {SandboxId: "sb-", TenantId: "tn-", KeyId: "key-", ProcessId: "p-"}
RANDOM_LEN = 16  # fixed: runsc matches container ids by prefix, so every id of a kind must be as long


@pytest.fixture(params=ID_TYPES, ids=lambda c: c.__name__)
def id_type(request: pytest.FixtureRequest) -> type[Any]:
    return request.param  # type: ignore[no-any-return]


def test_prefixes(id_type: type[Any]) -> None:
    assert id_type.prefix == ID_TYPES[id_type]


def test_new_ids_have_the_prefix_a_fixed_length_and_a_safe_alphabet(id_type: type[Any]) -> None:
    prefix = ID_TYPES[id_type]
    for _ in range(200):
        value = id_type.new()
        assert isinstance(value, id_type)
        assert isinstance(value, str)
        assert len(value) == len(prefix) + RANDOM_LEN
        # lowercase base32: safe in file names, cgroup names, DNS labels and runsc container ids
        assert re.fullmatch(re.escape(prefix) + r"[a-z2-7]{16}", value)
        assert id_type.is_valid(value)


def test_new_ids_are_unique(id_type: type[Any]) -> None:
    values = {id_type.new() for _ in range(20_000)}
    assert len(values) == 20_000


def test_a_valid_string_round_trips(id_type: type[Any]) -> None:
    value = id_type.new()
    again = id_type(str(value))
    assert again == value
    assert type(again) is id_type
    assert {value: 1}[str(value)] == 1  # hashes like the plain string: usable as a key either way


def test_ids_of_one_kind_are_not_accepted_as_another() -> None:
    sandbox = SandboxId.new()
    for other in (TenantId, KeyId, ProcessId):
        assert not other.is_valid(sandbox)
        with pytest.raises(InvalidRequest):
            other(sandbox)
    assert not SandboxId.is_valid(TenantId.new())


def _body(n: int = RANDOM_LEN) -> str:
    return "abcdefghijklmnopqrstuvwxyz234567"[:n]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sb-",
        "sb-" + _body(15),  # one short
        "sb-" + _body(16) + "a",  # one long
        "SB-" + _body(),  # prefix is case-sensitive
        "sb-" + _body().upper(),
        "sb-" + _body(15) + "0",  # 0, 1, 8, 9 are not base32
        "sb-" + _body(15) + "1",
        "sb-" + _body(15) + "8",
        "sb-" + _body(15) + "-",
        "sb_" + _body(),
        "sb" + _body(),
        " sb-" + _body(),
        "sb-" + _body() + " ",
        "sb-" + _body(8) + "/" + _body(7),  # never a path
        "sb-" + _body(8) + ".." + _body(6),
        "tn-" + _body(),
        "python",  # a template name is not a sandbox id
    ],
    ids=repr,
)
def test_malformed_sandbox_ids_are_rejected(value: str) -> None:
    assert not SandboxId.is_valid(value)
    with pytest.raises(InvalidRequest) as caught:
        SandboxId(value)
    err = caught.value
    assert (err.code, err.status) == ("invalid_request", 400)
    # The message names the kind, the expected form and the offending value, so a client can fix its call.
    assert "SandboxId" in err.message
    assert "sb-" in err.message
    assert "16" in err.message
    assert repr(value) in err.message


@pytest.mark.parametrize("value", [None, 42, b"sb-abcdefghijklmnop", ["sb-abcdefghijklmnop"]], ids=repr)
def test_non_strings_are_rejected(value: Any) -> None:
    assert not SandboxId.is_valid(value)
    with pytest.raises(InvalidRequest):
        SandboxId(value)


def test_trailing_newline_is_rejected() -> None:
    value = SandboxId.new() + "\n"
    assert not SandboxId.is_valid(value)
    with pytest.raises(InvalidRequest):
        SandboxId(value)


def test_request_ids_are_short_hex_and_unique() -> None:
    values = [new_request_id() for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", v) for v in values)
    assert len(set(values)) == len(values)
