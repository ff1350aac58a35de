"""HTTPS and E2B's domain mode, below the server: the TLS settings and their checks, ``corral certs make``, and
which sandbox and port a host name routes to (``e2b_target``, a pure function of the request's scope)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from corral.core.settings import Settings
from corral.errors import InvalidRequest
from corral.server import tls
from corral.server.certs import make_certs
from corral.server.e2b.sandbox_host import NO_ROUTE, E2BTarget, e2b_target

DOMAIN = "sandbox.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(DOMAIN, out)
    return out


def test_tls_and_the_e2b_domain_load_from_the_file_and_env(tmp_path: Path, certs: Path) -> None:
    (tmp_path / "c.toml").write_text(
        f'[server]\ntls_cert = "{certs}/{DOMAIN}.pem"\ntls_key = "{DOMAIN}.key"\n[e2b]\ndomain = "Sandbox.Test."\n'
    )
    settings = Settings.load(env={}, config=tmp_path / "c.toml")
    assert settings.tls_cert == certs / f"{DOMAIN}.pem"
    assert settings.tls_key == tmp_path / f"{DOMAIN}.key"  # relative: to the config file's folder
    assert settings.e2b_domain == DOMAIN and settings.e2b_sandbox_domain == DOMAIN
    env = {"CORRAL_TLS_CERT": "/a.pem", "CORRAL_TLS_KEY": "/a.key", "CORRAL_E2B_DOMAIN": "e.test"}
    from_env = Settings.load(env=env, config=tmp_path / "c.toml")
    assert (from_env.tls_cert, from_env.tls_key, from_env.e2b_domain) == (
        Path("/a.pem"),
        Path("/a.key"),
        "e.test",
    )
    assert Settings.load(env={}).e2b_sandbox_domain is None


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CORRAL_TLS_CERT": "/a.pem"}, "both a certificate and its key"),
        ({"CORRAL_TLS_KEY": "/a.key"}, "both a certificate and its key"),
        ({"CORRAL_E2B_DOMAIN": "https://sandbox.test/"}, "no scheme, no path"),
    ],
)
def test_half_or_bad_settings_are_clear_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        Settings.load(env=env)


def test_a_non_string_tls_path_in_the_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[server]\ntls_cert = 5\ntls_key = 6\n")
    with pytest.raises(InvalidRequest, match=r"\[server\] tls_cert .* must be a file path"):
        Settings.load(env={}, config=tmp_path / "c.toml")


def _settings(cert: Path, key: Path) -> Settings:
    return Settings.load(env={}, tls_cert=cert, tls_key=key)


def test_check_accepts_a_made_pair_and_sees_its_names(certs: Path) -> None:
    files = tls.check(_settings(certs / f"{DOMAIN}.pem", certs / f"{DOMAIN}.key"))
    assert files is not None
    assert set(files.names) == {DOMAIN, f"*.{DOMAIN}", f"api.{DOMAIN}"}
    assert tls.uncovered_e2b_names(files, DOMAIN) == []
    assert tls.uncovered_e2b_names(files, "other.test") == ["api.other.test", "49983-sandboxid.other.test"]
    assert tls.check(Settings.load(env={})) is None


def test_check_names_every_bad_file(tmp_path: Path, certs: Path) -> None:
    cert, key = certs / f"{DOMAIN}.pem", certs / f"{DOMAIN}.key"
    with pytest.raises(InvalidRequest, match=r"TLS certificate file .*/missing.pem .*does not exist"):
        tls.check(_settings(tmp_path / "missing.pem", key))
    with pytest.raises(InvalidRequest, match=r"TLS key file .*/missing.key .*does not exist"):
        tls.check(_settings(cert, tmp_path / "missing.key"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(InvalidRequest, match="is not a PEM certificate"):
        tls.check(_settings(tmp_path / "junk.pem", key))
    with pytest.raises(InvalidRequest, match="is not a PEM private key without a passphrase"):
        tls.check(_settings(cert, tmp_path / "junk.pem"))
    with pytest.raises(InvalidRequest, match="is not the key of the certificate in"):
        tls.check(_settings(cert, certs / "ca.key"))  # a key, but not this certificate's


def test_certs_make_signs_with_one_ca_that_python_trusts(tmp_path: Path) -> None:
    first = make_certs(DOMAIN, tmp_path)
    second = make_certs("other.test", tmp_path)
    assert first.ca_created and not second.ca_created
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        f"{DOMAIN}.pem": 0o644,
        f"{DOMAIN}.key": 0o600,
        "other.test.pem": 0o644,
        "other.test.key": 0o600,
    }
    client = ssl.create_default_context(cafile=str(first.ca_cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(first.cert, first.key)
    for name in (f"api.{DOMAIN}", f"49983-sb-abc.{DOMAIN}", DOMAIN):
        assert _handshake(client, server, name) == "ok"
    assert "mismatch" in _handshake(client, server, f"a.b.{DOMAIN}")  # "*" is one label
    assert "mismatch" in _handshake(client, server, "api.other.test")
    untrusting = ssl.create_default_context()
    assert "unable to get local issuer" in _handshake(untrusting, server, f"api.{DOMAIN}")
    with pytest.raises(InvalidRequest, match="already exists; pass --force"):
        make_certs(DOMAIN, tmp_path)
    assert make_certs(DOMAIN, tmp_path, force=True).cert == first.cert


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> str:
    """A TLS handshake in memory (no socket): "ok", or the client's verification error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, bio_out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return exc.verify_message
            except ssl.SSLError as exc:
                if side is c:
                    return str(exc)
            peer_in.write(bio_out.read())
        if c.version() is not None and s.version() is not None:
            try:
                c.do_handshake()
                return "ok"
            except ssl.SSLCertVerificationError as exc:
                return exc.verify_message
    return "no handshake"


@pytest.mark.parametrize("domain", ["bad domain", "has:port", "single"], ids=["space", "port", "one-label"])
def test_certs_make_refuses_a_bad_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InvalidRequest, match="--domain must be a DNS name"):
        make_certs(domain, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_prints_the_settings_to_serve_with(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "certs", "make", "--domain", DOMAIN, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"export CORRAL_TLS_CERT={tmp_path}/{DOMAIN}.pem CORRAL_TLS_KEY={tmp_path}/{DOMAIN}.key "
        f"CORRAL_E2B_DOMAIN={DOMAIN}"
    )
    again = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "certs", "make", "--domain", DOMAIN, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr


def _scope(host: str, path: str = "/", **headers: str) -> dict[str, object]:
    raw = [(b"host", host.encode())] + [
        (k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()
    ]
    return {"type": "http", "path": path, "query_string": b"", "headers": raw}


@pytest.mark.parametrize(
    ("host", "headers", "domain", "want"),
    [
        # domain mode: names under the domain are E2B's; a sandbox host name beats the headers
        ("49983-sb-a.sandbox.test", {}, DOMAIN, E2BTarget(sandbox_id="sb-a", port=49983)),
        ("49999-sb-a.Sandbox.Test:443", {}, DOMAIN, E2BTarget(sandbox_id="sb-a", port=49999)),
        ("8080-sb-a.sandbox.test", {}, DOMAIN, E2BTarget(sandbox_id="sb-a", port=8080)),
        (
            "49983-sb-a.sandbox.test",
            {"e2b_sandbox_id": "sb-b", "e2b_sandbox_port": "49999"},
            DOMAIN,
            E2BTarget(sandbox_id="sb-a", port=49983),
        ),
        ("api.sandbox.test", {}, DOMAIN, None),
        ("api.sandbox.test", {"e2b_sandbox_id": "sb-b"}, DOMAIN, E2BTarget(sandbox_id="sb-b", port=49983)),
        ("sandbox.test", {}, DOMAIN, None),
        (
            "sandbox.sandbox.test",
            {"e2b_sandbox_id": "sb-b"},
            DOMAIN,
            E2BTarget(sandbox_id="sb-b", port=49983),
        ),
        ("www.sandbox.test", {}, DOMAIN, E2BTarget(sandbox_id="", port=NO_ROUTE)),
        ("a.49983-sb-a.sandbox.test", {}, DOMAIN, E2BTarget(sandbox_id="", port=NO_ROUTE)),
        ("49983-sb-a.evil.test", {}, DOMAIN, E2BTarget(sandbox_id="sb-a", port=49983)),
        ("8080-sb-a.evil.test", {}, DOMAIN, None),  # Corral's own port proxy decides about it
        ("notsandbox.test", {}, DOMAIN, None),
        # no domain configured: the envd and interpreter ports under any domain, else the headers
        ("49983-sb-a.localhost:8700", {}, None, E2BTarget(sandbox_id="sb-a", port=49983)),
        (
            "127.0.0.1:8700",
            {"e2b_sandbox_id": "sb-b", "e2b_sandbox_port": "49999"},
            None,
            E2BTarget(sandbox_id="sb-b", port=49999),
        ),
        ("127.0.0.1:8700", {}, None, None),
        ("[::1]:8700", {}, None, None),
    ],
)
def test_which_sandbox_a_host_name_routes_to(
    host: str, headers: dict[str, str], domain: str | None, want: E2BTarget | None
) -> None:
    assert e2b_target(_scope(host, **headers), domain) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["cert", "key"])
def test_serve_refuses_a_missing_tls_file_before_it_starts(tmp_path: Path, certs: Path, which: str) -> None:
    files = {"cert": certs / f"{DOMAIN}.pem", "key": certs / f"{DOMAIN}.key"}
    files[which] = tmp_path / "gone.pem"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_TLS")}
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--port", "1", "--tls-cert", str(files["cert"]),
         "--tls-key", str(files["key"])],
        capture_output=True, text=True, timeout=60, env={**env, "CORRAL_DATA_DIR": str(tmp_path / "data")},
    )  # fmt: skip
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # the console wraps long lines
    assert f"TLS {'certificate' if which == 'cert' else 'key'} file {tmp_path}/gone.pem" in said
    assert "Traceback" not in done.stderr and "serving on" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing made before the check
