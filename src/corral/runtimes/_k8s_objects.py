"""The agent-sandbox objects Corral makes, as plain manifests (pure functions: no I/O, easy to test and diff).

One **blueprint** (image, RuntimeClass, limits and the settings that shape a Pod) is one SandboxTemplate, one
SandboxWarmPool and one bootstrap Secret, all named ``corral-<digest>`` after the blueprint, shared by every
sandbox made from it. Each sandbox is one SandboxClaim named after its Corral id (``sb-…`` is a DNS label).

The Pod (see :func:`pod_template`):

- an init container from Corral's agent image copies the agent bundle (a self-contained Python and the agent,
  the same bundle the local runtimes mount at ``/.corral``) into an ``emptyDir``, and the pool's bootstrap
  secret from the Secret volume into a memory-backed ``emptyDir``. The sandbox container never mounts the
  Secret itself; the agent reads the copy at start and deletes it (:mod:`corral.agent.auth`), so code in the
  sandbox finds it nowhere. The image needs no Python and no shell.
- the sandbox container runs the template's image with the agent as its command, on TCP, authenticated; a
  readiness probe on that port makes Ready mean "the agent listens".
- restricted Pod security: non-root, no service account token, no privilege escalation, all capabilities
  dropped, RuntimeDefault seccomp, a read-only root (``/tmp`` and the home directory are ``emptyDir``) unless
  the settings say the template needs a writable one, and requests = limits from the sandbox's Limits.

The template's NetworkPolicy (agent-sandbox manages one per template): ingress only from Corral's server Pods
to the agent port, and no egress at all (no RFC 1918, no link-local/metadata, no cluster DNS, no internet):
Corral's network mode ``none``. A sandbox with another policy gets its own NetworkPolicy on top
(:mod:`._k8s_netpol`; NetworkPolicies only add allowed traffic), selecting its Pod by :data:`LABEL_SANDBOX`,
which the claim asks agent-sandbox to put on the Pod (``additionalPodMetadata``: it labels an adopted warm
Pod too, so no cold start).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.runtimes.base import Limits

__all__ = [
    "BOOTSTRAP_KEY",
    "CLAIM_API",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "LABEL_SANDBOX",
    "POOL_API",
    "SANDBOX_API",
    "TEMPLATE_API",
    "Blueprint",
    "claim",
    "pod_template",
    "secret",
    "template",
    "warm_pool",
]

SANDBOX_API = ("agents.x-k8s.io", "v1beta1", "Sandbox", "sandboxes")
TEMPLATE_API = ("extensions.agents.x-k8s.io", "v1beta1", "SandboxTemplate", "sandboxtemplates")
POOL_API = ("extensions.agents.x-k8s.io", "v1beta1", "SandboxWarmPool", "sandboxwarmpools")
CLAIM_API = ("extensions.agents.x-k8s.io", "v1beta1", "SandboxClaim", "sandboxclaims")

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_SANDBOX = "corral.dev/sandbox"
LABEL_NODE = "corral.dev/node"
LABEL_BLUEPRINT = "corral.dev/blueprint"
BOOTSTRAP_KEY = "agent-secret"
# On every claim: a deletion (by the deadline, or by someone else) leaves it, marked, until Corral has seen it,
# so a reaper can tell "ended at its deadline" from "deleted behind Corral's back" (destroy removes it).
FINALIZER = "corral.dev/reap"

AGENT_DIR = "/.corral"  # the bundle, where the local runtimes mount it too
SECRET_DIR = "/.corral-secret"  # noqa: S105 - a path, not a password; the copied secret (memory-backed), deleted by the agent at start
BUNDLE_IN_IMAGE = "/corral-bundle"  # where the agent image keeps the bundle
_BOOTSTRAP_DIR = "/corral-bootstrap"  # the Secret volume: mounted in the init container only
# What the init container runs with the bundle's own Python: copy the bundle, then the secret (mode 0400).
_INSTALL = (
    "import os,shutil,sys;s,d,k,t=sys.argv[1:];shutil.copytree(s,d,symlinks=True,dirs_exist_ok=True);"
    "f=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_EXCL,0o400);os.write(f,open(k,'rb').read());os.close(f)"
)


@dataclass(frozen=True, kw_only=True)
class Blueprint:
    """Everything that shapes a sandbox Pod; equal blueprints share a template and a warm pool."""

    image: str
    runtime_class: str | None
    limits: Limits
    agent_image: str
    agent_port: int
    loader: str  # the bundle's dynamic loader (per CPU architecture)
    run_as_user: int
    read_only_root: bool
    server_pod_labels: Mapping[str, str] = field(default_factory=dict)
    server_namespace_labels: Mapping[str, str] | None = None  # None: Corral runs in the sandboxes' namespace

    @property
    def name(self) -> str:
        data = asdict(self)
        data["server_pod_labels"] = dict(self.server_pod_labels)
        if self.server_namespace_labels is not None:
            data["server_namespace_labels"] = dict(self.server_namespace_labels)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
        return f"corral-{digest}"

    @property
    def secret_name(self) -> str:
        return f"{self.name}-agent"


def _meta(name: str, namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED: "corral", **labels}}


def _api(api: tuple[str, str, str, str]) -> dict[str, str]:
    return {"apiVersion": f"{api[0]}/{api[1]}", "kind": api[2]}


def _quantity_cpu(cpus: float) -> str:
    return f"{math.ceil(cpus * 1000)}m"


def _resources(limits: Limits) -> dict[str, Any]:
    amounts: dict[str, str] = {"cpu": _quantity_cpu(limits.cpus), "memory": f"{limits.memory_mb}Mi"}
    if limits.disk_mb is not None:
        amounts["ephemeral-storage"] = f"{limits.disk_mb}Mi"
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security(read_only_root: bool) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
    }


def agent_command(bp: Blueprint) -> list[str]:
    """The sandbox container's command: the bundle's loader runs its Python with the agent, on TCP."""
    return [
        f"{AGENT_DIR}/lib/{bp.loader}",
        "--library-path",
        f"{AGENT_DIR}/lib",
        f"{AGENT_DIR}/bin/python3",
        "-I",
        "-S",
        "-B",
        "-m",
        "corral.agent",
        "--listen",
        f"tcp:0.0.0.0:{bp.agent_port}",
        "--secret-file",
        f"{SECRET_DIR}/{BOOTSTRAP_KEY}",
    ]


def pod_template(bp: Blueprint) -> dict[str, Any]:
    uid = bp.run_as_user
    install = [
        f"{BUNDLE_IN_IMAGE}/lib/{bp.loader}",
        "--library-path",
        f"{BUNDLE_IN_IMAGE}/lib",
        f"{BUNDLE_IN_IMAGE}/bin/python3",
        "-I",
        "-S",
        "-c",
        _INSTALL,
        BUNDLE_IN_IMAGE,
        AGENT_DIR,
        f"{_BOOTSTRAP_DIR}/{BOOTSTRAP_KEY}",
        f"{SECRET_DIR}/{BOOTSTRAP_KEY}",
    ]
    small = {"cpu": "100m", "memory": "64Mi"}
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",  # a sandbox whose agent died is over; Corral reports it, it does not respawn
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [
            {
                "name": "corral-agent-install",
                "image": bp.agent_image,
                "command": install,
                "securityContext": _container_security(True),
                "resources": {"requests": small, "limits": small},
                "volumeMounts": [
                    {"name": "corral-agent", "mountPath": AGENT_DIR},
                    {"name": "corral-secret", "mountPath": SECRET_DIR},
                    {"name": "corral-bootstrap", "mountPath": _BOOTSTRAP_DIR, "readOnly": True},
                ],
            }
        ],
        "containers": [
            {
                "name": "sandbox",
                "image": bp.image,
                "command": agent_command(bp),
                "ports": [{"name": "corral-agent", "containerPort": bp.agent_port, "protocol": "TCP"}],
                "readinessProbe": {"tcpSocket": {"port": bp.agent_port}, "periodSeconds": 1},
                "securityContext": _container_security(bp.read_only_root),
                "resources": _resources(bp.limits),
                "volumeMounts": [
                    {"name": "corral-agent", "mountPath": AGENT_DIR, "readOnly": True},
                    {"name": "corral-secret", "mountPath": SECRET_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "home", "mountPath": "/home/user"},
                ],
            }
        ],
        "volumes": [
            {"name": "corral-agent", "emptyDir": {}},
            {"name": "corral-secret", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "corral-bootstrap", "secret": {"secretName": bp.secret_name, "defaultMode": 0o400}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "home", "emptyDir": {}},
        ],
    }
    if bp.runtime_class:
        spec["runtimeClassName"] = bp.runtime_class
    return {"metadata": {"labels": {LABEL_MANAGED: "corral", LABEL_BLUEPRINT: bp.name}}, "spec": spec}


def network_policy(bp: Blueprint) -> dict[str, Any]:
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(bp.server_pod_labels)}}
    if bp.server_namespace_labels is not None:
        peer["namespaceSelector"] = {"matchLabels": dict(bp.server_namespace_labels)}
    return {
        "ingress": [{"from": [peer], "ports": [{"protocol": "TCP", "port": bp.agent_port}]}],
        "egress": [],  # an empty list denies every destination, cluster DNS included
    }


def template(bp: Blueprint, namespace: str) -> dict[str, Any]:
    return {
        **_api(TEMPLATE_API),
        "metadata": _meta(bp.name, namespace, {LABEL_BLUEPRINT: bp.name}),
        "spec": {
            "podTemplate": pod_template(bp),
            "networkPolicyManagement": "Managed",
            "networkPolicy": network_policy(bp),
            "envVarsInjectionPolicy": "Disallowed",  # env is late-bound through the agent, never a cold start
        },
    }


def warm_pool(bp: Blueprint, namespace: str, replicas: int) -> dict[str, Any]:
    return {
        **_api(POOL_API),
        "metadata": _meta(bp.name, namespace, {LABEL_BLUEPRINT: bp.name}),
        "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": bp.name}},
    }


def secret(
    bp: Blueprint, namespace: str, value: bytes, api: tuple[str, str, str, str], owner: dict[str, Any] | None
) -> dict[str, Any]:
    import base64

    meta = _meta(bp.secret_name, namespace, {LABEL_BLUEPRINT: bp.name})
    if owner is not None:  # deleted with its template by the garbage collector
        meta["ownerReferences"] = [owner]
    return {
        **_api(api),
        "metadata": meta,
        "type": "Opaque",
        "immutable": True,
        "data": {BOOTSTRAP_KEY: base64.b64encode(value).decode()},
    }


def claim(
    name: str, bp: Blueprint, namespace: str, *, node: str, shutdown_time: str | None
) -> dict[str, Any]:
    """A claim carries no env and no volumes: either would force agent-sandbox into a cold start. Its Pod gets
    the label :data:`LABEL_SANDBOX` (``additionalPodMetadata``), which the sandbox's NetworkPolicy selects."""
    spec: dict[str, Any] = {
        "warmPoolRef": {"name": bp.name},
        "additionalPodMetadata": {"labels": {LABEL_SANDBOX: name}},
    }
    if shutdown_time is not None:
        spec["lifecycle"] = {"shutdownTime": shutdown_time, "shutdownPolicy": "Delete"}
    meta = _meta(name, namespace, {LABEL_SANDBOX: name, LABEL_NODE: node, LABEL_BLUEPRINT: bp.name})
    meta["finalizers"] = [FINALIZER]
    return {**_api(CLAIM_API), "metadata": meta, "spec": spec}


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "blockOwnerDeletion": False,
    }
