"""Secrets: request shapes, host binding, sealing at rest, the per-sandbox CA and the proxy's HTTP checks."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import h11
import pytest

from corral.core.secrets import EgressSecrets, Sealer, bind, sandbox_env
from corral.core.settings import Settings
from corral.errors import InvalidRequest
from corral.models import CreateParams
from corral.netpolicy import NetworkPolicy
from corral.runtimes._net import intercept
from corral.secrets import SecretBinding, parse_secrets

VALUE = "sk-unit-0123456789abcdef"
POLICY = NetworkPolicy.parse({"allow_out": ["api.example.com", "*.files.example.com", "203.0.113.0/24"]})


def test_default_binding_is_the_allow_out_names_and_placeholders_are_fresh() -> None:
    (one,) = parse_secrets({"KEY": VALUE}, POLICY)
    (two,) = parse_secrets({"KEY": VALUE}, POLICY)
    assert one.hosts == ("api.example.com", "*.files.example.com")  # names only, not the CIDR
    assert (
        one.placeholder.startswith("CORRAL_SECRET_KEY_")
        and len(one.placeholder) == len("CORRAL_SECRET_KEY_") + 32
    )
    assert one.placeholder != two.placeholder and VALUE not in one.placeholder
    assert VALUE not in repr(one) and one.placeholder not in repr(one)
    assert one.binds("API.example.com.") and one.binds("a.files.example.com")
    assert not one.binds("files.example.com") and not one.binds("api.example.com.evil.test")


@pytest.mark.parametrize(
    ("given", "policy", "says"),
    [
        ({"K": VALUE}, "none", "need network"),
        ({"K": VALUE}, "internet", "bound to no host"),
        ({"K": {"value": VALUE, "hosts": ["other.example.com"]}}, POLICY, "does not allow"),
        ({"K": {"value": VALUE, "hosts": ["203.0.113.7"]}}, POLICY, "not a host name"),
        ({"K": {"value": VALUE, "hosts": ["api.example.com:443"]}}, POLICY, "not a host name"),
        ({"K": {"value": VALUE, "hosts": []}}, POLICY, "non-empty list"),
        ({"K": VALUE + "\r\nX-Evil: 1"}, POLICY, "printable ASCII"),
        ({"K": "é" + VALUE}, POLICY, "printable ASCII"),
        ({"K": ""}, POLICY, "printable ASCII"),
        ({"1K": VALUE}, POLICY, "environment variable names"),
        ({"K": {"value": VALUE, "extra": 1}}, POLICY, "a string, or"),
        ({"K": {"value": VALUE, "body": "yes"}}, POLICY, "true or false"),
        ([VALUE], POLICY, "map names"),
    ],
)
def test_bad_secrets_are_refused_without_their_value(given: object, policy: object, says: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_secrets(given, NetworkPolicy.parse(policy))
    assert says in err.value.message
    assert VALUE not in err.value.message and VALUE not in json.dumps(err.value.details)


def test_explicit_hosts_may_be_wildcards_the_policy_allows() -> None:
    (b,) = parse_secrets({"K": {"value": VALUE, "hosts": ["*.files.example.com"], "body": True}}, POLICY)
    assert b.hosts == ("*.files.example.com",) and b.body


def test_a_secret_is_not_also_an_env_variable_and_the_env_gets_placeholders() -> None:
    with pytest.raises(InvalidRequest, match="both a secret and an env"):
        bind({"K": VALUE}, POLICY, {"K": "x"})
    bindings = bind({"K": VALUE}, POLICY, {"A": "1", "SSL_CERT_FILE": "/mine.pem"})
    env = sandbox_env({"A": "1", "SSL_CERT_FILE": "/mine.pem"}, bindings)
    assert env["K"] == bindings[0].placeholder and env["A"] == "1"
    assert env["SSL_CERT_FILE"] == "/mine.pem"  # the caller's own choice wins
    assert env["NODE_EXTRA_CA_CERTS"].endswith(".pem") and VALUE not in json.dumps(env)
    assert sandbox_env({"A": "1"}, ()) == {"A": "1"}


def test_create_params_hide_values_from_repr() -> None:
    params = CreateParams(network={"allow_out": ["api.example.com"]}, secrets={"K": VALUE})
    assert VALUE not in repr(params)
    assert params.secrets == {"K": {"value": VALUE, "hosts": None, "body": False}}
    with pytest.raises(InvalidRequest):
        CreateParams(secrets={"K": 3})


def test_sealer_key_file_is_private_and_values_are_sealed(tmp_path: Path) -> None:
    key = tmp_path / "state" / "secrets.key"
    sealer = Sealer.from_file(key)
    assert key.stat().st_mode & 0o777 == 0o600
    bindings = parse_secrets({"K": VALUE}, POLICY)
    token = sealer.seal(bindings)
    assert VALUE not in token and bindings[0].placeholder not in token
    assert Sealer.from_file(key).open(token) == bindings  # the same key again, read back
    with pytest.raises(InvalidRequest, match="cannot be opened"):
        Sealer.from_file(tmp_path / "other.key").open(token)
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(InvalidRequest, match="not a Fernet key"):
        Sealer.from_file(tmp_path / "bad.key")


def test_settings_name_the_key_file_and_the_upstream_ca(tmp_path: Path) -> None:
    assert Settings.load({"CORRAL_DATA_DIR": str(tmp_path)}).secrets_key_path == tmp_path / "secrets.key"
    env = {"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_SECRETS_KEY_FILE": "/k/s.key",
           "CORRAL_EGRESS_UPSTREAM_CA_FILE": "/ca.pem"}  # fmt: skip
    settings = Settings.load(env)
    assert settings.secrets_key_path == Path("/k/s.key") and settings.egress.upstream_ca_file == "/ca.pem"
    conf = tmp_path / "corral.toml"
    conf.write_text('[secrets]\nkey_file = "/x/y.key"\n[network]\nupstream_ca_file = "/extra.pem"\n')
    settings = Settings.load({"CORRAL_DATA_DIR": str(tmp_path)}, config=conf)
    assert settings.secrets_key_path == Path("/x/y.key") and settings.egress.upstream_ca_file == "/extra.pem"


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """A TLS handshake between two in-memory ends; the ALPN protocol chosen (raises on a bad certificate)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=name)
    done = [False, False]
    for _ in range(20):
        for i, (end, out, peer_in) in enumerate(((cli, c_out, s_in), (srv, s_out, c_in))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return cli.selected_alpn_protocol()
    raise AssertionError("handshake did not finish")


def test_the_sandbox_ca_vouches_for_its_bound_hosts_only(tmp_path: Path) -> None:
    bindings = parse_secrets({"K": {"value": VALUE, "hosts": ["api.example.com"]}}, POLICY)
    egress = EgressSecrets.make("sb-test", bindings)
    assert "PRIVATE" not in egress.ca_cert and VALUE not in repr(egress) and "PRIVATE" not in repr(egress)
    proxy = intercept.Interceptor(egress.to_wire(), None)
    (tmp_path / "ca.pem").write_text(egress.ca_cert)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client.set_alpn_protocols(["h2", "http/1.1"])
    assert _handshake(proxy.leaves.context("api.example.com"), client, "api.example.com") == "http/1.1"
    assert proxy.leaves.context("api.example.com") is proxy.leaves.context("api.example.com")  # cached
    # a leaf for any other name, even signed by the same key, fails the CA's name constraints
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(proxy.leaves.context("bank.example.org"), client, "bank.example.org")
    assert proxy.binds("api.example.com") and not proxy.binds("other.example.com") and not proxy.binds(None)


def test_masking_keeps_lengths_and_catches_values_split_across_chunks() -> None:
    masker = intercept._Masker((VALUE.encode(),))
    stream = masker.stream()
    data = b"head " + VALUE.encode() + b" middle " + VALUE.encode() + b" tail"
    out = b""
    for i in range(0, len(data), 7):  # chunks that cut the value anywhere
        out += stream.feed(data[i : i + 7])
    out += stream.end()
    assert len(out) == len(data) and VALUE.encode() not in out and out.count(b"*" * len(VALUE)) == 2


def _request(target: bytes = b"/", method: bytes = b"GET", **headers: str) -> h11.Request:
    hs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    return h11.Request(method=method, target=target, headers=hs)


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (_request(host="other.example.com"), 421),
        (_request(host="api.example.com.evil.test"), 421),
        (_request(b"other.example.com:443", b"CONNECT", host="api.example.com"), 405),
        (_request(b"http://other.example.com/", host="api.example.com"), 400),
        (_request(host="api.example.com", upgrade="websocket", connection="upgrade"), 501),
    ],
)
def test_requests_that_could_carry_a_value_elsewhere_are_refused(request_: h11.Request, status: int) -> None:
    with pytest.raises(intercept._Abort) as err:
        intercept._check_request(request_, "api.example.com")
    assert err.value.status == status


def test_a_request_to_the_bound_host_gets_its_values_only() -> None:
    bound, other = (
        SecretBinding(name="A", value="va", hosts=("api.example.com",), placeholder="CORRAL_SECRET_A_1"),
        SecretBinding(name="B", value="vb", hosts=("x.example.com",), placeholder="CORRAL_SECRET_B_2"),
    )
    headers = intercept._check_request(_request(host="API.example.com:443"), "api.example.com")
    assert headers == [(b"host", b"API.example.com:443")]
    text = b"Bearer CORRAL_SECRET_A_1 CORRAL_SECRET_B_2"
    assert intercept._substitute(text, (bound,)) == b"Bearer va CORRAL_SECRET_B_2"
    assert other.placeholder.encode() in intercept._substitute(text, (bound,))
