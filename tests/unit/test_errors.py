"""The error tree's wire contract: codes and statuses, the server's JSON body, and the SDK's rebuild of it."""

from __future__ import annotations

import json
from typing import Any

import pytest

import corral.errors as errors_module
from corral.errors import (
    AgentUnavailable,
    CommandFailed,
    Conflict,
    CorralError,
    InvalidNetworkPolicy,
    InvalidRequest,
    InvalidState,
    NotFound,
    PermissionDenied,
    PortClosed,
    ResourceExhausted,
    RuntimeFailure,
    RuntimeUnavailable,
    Timeout,
    TransportError,
    Unauthenticated,
    Unsupported,
    from_wire,
)

# The wire contract (DESIGN §4 "Errors"): clients in other languages and older SDKs match on these strings,
# so a change here is a breaking API change, not a refactoring.
WIRE_CONTRACT: dict[type[CorralError], tuple[str, int]] = {
    InvalidRequest: ("invalid_request", 400),
    InvalidNetworkPolicy: ("invalid_network_policy", 400),
    Unauthenticated: ("unauthenticated", 401),
    PermissionDenied: ("permission_denied", 403),
    NotFound: ("not_found", 404),
    Conflict: ("conflict", 409),
    InvalidState: ("invalid_state", 409),
    ResourceExhausted: ("resource_exhausted", 429),
    Unsupported: ("unsupported", 501),
    RuntimeUnavailable: ("runtime_unavailable", 501),
    RuntimeFailure: ("runtime_failure", 502),
    AgentUnavailable: ("agent_unavailable", 502),
    Timeout: ("timeout", 504),
    TransportError: ("transport_error", 503),
    PortClosed: ("port_closed", 502),
}
SDK_ONLY = {CommandFailed}


def all_subclasses(cls: type[CorralError]) -> set[type[CorralError]]:
    subs = set(cls.__subclasses__())
    return subs.union(*(all_subclasses(s) for s in subs))


def over_the_wire(err: CorralError) -> CorralError:
    """What the SDK raises for ``err``: the server's JSON body and HTTP status, through real JSON text."""
    body = json.loads(json.dumps(err.to_wire()))
    return from_wire(body, status=err.status)


def test_every_error_class_is_in_the_wire_contract() -> None:
    # A new class must be added to WIRE_CONTRACT (or SDK_ONLY) on purpose.
    assert all_subclasses(CorralError) == set(WIRE_CONTRACT) | SDK_ONLY


@pytest.mark.parametrize("cls", WIRE_CONTRACT, ids=lambda c: c.__name__)
def test_code_and_status(cls: type[CorralError]) -> None:
    assert (cls.code, cls.status) == WIRE_CONTRACT[cls]


def test_codes_are_unique() -> None:
    codes = [c.code for c in all_subclasses(CorralError)] + [CorralError.code]
    assert len(codes) == len(set(codes))


def test_every_error_class_is_exported() -> None:
    exported = {getattr(errors_module, name) for name in errors_module.__all__}
    assert all_subclasses(CorralError) | {CorralError} <= exported


@pytest.mark.parametrize("cls", WIRE_CONTRACT, ids=lambda c: c.__name__)
def test_wire_round_trip_rebuilds_the_same_class(cls: type[CorralError]) -> None:
    err = cls("sandbox sb-x is paused; resume it first", details={"sandbox_id": "sb-x", "limits": [1, 2]})
    again = over_the_wire(err)
    assert type(again) is cls
    assert again.message == err.message
    assert str(again) == err.message
    assert again.details == {"sandbox_id": "sb-x", "limits": [1, 2]}
    assert again.code == cls.code
    assert again.status == cls.status


def test_wire_body_shape() -> None:
    err = NotFound("no sandbox sb-x", details={"sandbox_id": "sb-x"})
    assert err.to_wire() == {
        "error": {"code": "not_found", "message": "no sandbox sb-x", "details": {"sandbox_id": "sb-x"}}
    }
    assert NotFound("gone").to_wire()["error"]["details"] == {}


def test_base_error_round_trips_as_internal() -> None:
    again = over_the_wire(CorralError("something broke"))
    assert type(again) is CorralError
    assert (again.code, again.status, again.message) == ("internal", 500, "something broke")


def test_details_are_copied_not_shared() -> None:
    details: dict[str, Any] = {"a": 1}
    err = InvalidRequest("bad", details=details)
    details["a"] = 2
    assert err.details == {"a": 1}


def test_subclasses_are_caught_by_their_parents() -> None:
    assert issubclass(InvalidState, Conflict)
    assert issubclass(RuntimeUnavailable, Unsupported)
    with pytest.raises(Conflict):
        raise over_the_wire(InvalidState("sandbox is killed"))


# Unknown codes (a newer server than this SDK) fall back to the general class for the HTTP status: the direct
# child of CorralError with that status, never a more specific subclass that would claim too much.
FALLBACK_BY_STATUS = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: ResourceExhausted,
    501: Unsupported,
    502: RuntimeFailure,
    503: TransportError,
    504: Timeout,
    500: CorralError,
    418: CorralError,  # a status no class claims
}


@pytest.mark.parametrize(("status", "cls"), FALLBACK_BY_STATUS.items(), ids=str)
def test_unknown_code_falls_back_by_status(status: int, cls: type[CorralError]) -> None:
    body = {"error": {"code": "quota_of_the_future", "message": "too many hats", "details": {"hats": 3}}}
    err = from_wire(body, status=status)
    assert type(err) is cls
    assert err.message == "too many hats"
    assert err.details == {"hats": 3}


def test_sdk_only_code_from_a_server_is_not_rebuilt_as_that_class() -> None:
    # CommandFailed is raised by the SDK itself (check=True); a server never sends it.
    body = CommandFailed("exit 1", exit_code=1).to_wire()
    err = from_wire(body, status=500)
    assert type(err) is CorralError
    assert err.message == "exit 1"


def test_error_body_with_status_200_still_gives_an_error() -> None:
    err = from_wire({"error": {"code": "quota_of_the_future", "message": "odd"}}, status=200)
    assert type(err) is CorralError


@pytest.mark.parametrize(
    "body",
    [
        None,
        "Bad Gateway",
        [],
        {},
        {"error": "oops"},
        {"detail": "Not Found"},  # a proxy's or framework's own error page
    ],
    ids=repr,
)
def test_malformed_body_gives_a_generic_error(body: Any) -> None:
    err = from_wire(body, status=502)
    assert type(err) is CorralError
    assert "502" in err.message


def test_missing_message_and_bad_details_are_tolerated() -> None:
    err = from_wire({"error": {"code": "not_found", "details": ["not", "a", "dict"]}}, status=404)
    assert type(err) is NotFound
    assert err.message == "HTTP 404"
    assert err.details == {}


def test_command_failed_carries_the_result() -> None:
    err = CommandFailed("`false` exited with 1", exit_code=1, stdout="out", stderr="err")
    assert (err.exit_code, err.stdout, err.stderr) == (1, "out", "err")
    assert err.details == {"exit_code": 1}
    assert isinstance(err, CorralError)
