"""The Kubernetes runtime: sandboxes are kubernetes-sigs/agent-sandbox Pods, reached over an authenticated TCP.

``create`` makes sure the sandbox's **blueprint** exists (a SandboxTemplate, a SandboxWarmPool and a bootstrap
Secret, shared by every sandbox of the same image, RuntimeClass and limits: :mod:`._k8s_objects`), then creates
one SandboxClaim named after the sandbox and waits, on a watch, for agent-sandbox to bind it to a Ready
Sandbox. The claim carries no env and no volumes (either would force a cold start): env, files and metadata
are bound late, through the agent, by the core, so a warm Pod serves any tenant. The deadline is the claim's
``shutdownTime`` with policy Delete, so the cluster ends the sandbox even when no Corral server runs.

The agent runs in the sandbox container (copied there by an init container), listens on TCP and accepts only
peers that prove they hold the sandbox's secret (:mod:`corral.protocol.auth`). A Pod starts with its pool's
bootstrap secret; the first connection (at create) rekeys it with a fresh salt kept in the Instance, so each
sandbox ends up with its own secret, ``derive(bootstrap, salt)``, that any Corral server holding the bootstrap
Secret can recompute and that is never on the wire nor in the Pod spec.

kill → delete the claim (agent-sandbox deletes the Sandbox and its Pod). pause → ``operatingMode: Suspended``,
which deletes the Pod: processes, memory and the container's files are gone, and a resume starts a new Pod from
the template. A claim or Sandbox deleted behind Corral's back is reported as missing.

Egress: a sandbox whose policy is not ``none`` gets a NetworkPolicy of its own (:mod:`._k8s_netpol`), named
after it, owned by its claim (the garbage collector deletes it with the claim, e.g. at the deadline), made
right after the claim and before the wait, and deleted by destroy and by :meth:`KubernetesRuntime.prune`.
Only address rules can be enforced this way; a policy with host names is refused before anything is made.
A NetworkPolicy is enforced by the cluster's CNI (Calico, Cilium, the EKS VPC CNI's network policy agent):
on a cluster whose CNI does not enforce them there is no egress control at all, and nothing here can tell.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from anyio.abc import ByteStream

from corral.agent import AGENT_VERSION
from corral.errors import AgentUnavailable, Conflict, InvalidRequest, RuntimeFailure, Unsupported
from corral.protocol import auth
from corral.runtimes import _k8s_objects as objects
from corral.runtimes._agent_dial import auth_refused, dial_tcp
from corral.runtimes._k8s_api import Api, Gone, KubeApi
from corral.runtimes._k8s_netpol import NETPOL_API
from corral.runtimes._k8s_network import KubernetesNetwork
from corral.runtimes.base import (
    Capabilities,
    Instance,
    Limits,
    Observed,
    ObservedState,
    OciImage,
    RootfsKind,
    RuntimeConfig,
    SandboxSpec,
    Snapshot,
)

__all__ = ["KubernetesRuntime", "KubernetesSettings"]

log = logging.getLogger("corral.runtimes.kubernetes")

# Reasons agent-sandbox writes on a claim's Ready=False that will not resolve by waiting.
_FATAL_CLAIM_REASONS = frozenset(
    {"TemplateNotFound", "WarmPoolNotFound", "EnvVarsInjectionRejected", "VolumeClaimTemplatesError",
     "InvalidMetadata", "ClaimExpired", "PodFailed", "PodSucceeded", "SandboxExpired", "ReconcilerError"}
)  # fmt: skip


# pause would be agent-sandbox's operatingMode Suspended, which deletes the Pod: a "pause" that loses what a
# pause keeps is not offered (a resume would be a new Pod from the template, i.e. a new sandbox)
_PAUSE_REFUSAL = (
    "agent-sandbox suspends a Sandbox by deleting its Pod, so its processes, memory and files would all be"
    " lost; keep it running, or kill it and create a new one"
)


@dataclass(frozen=True, kw_only=True)
class KubernetesSettings:
    """``[runtime.kubernetes]``. Every field has a default that works in a cluster set up by ``deploy/``."""

    kubeconfig: str | None = None  # None: in-cluster ServiceAccount, else $KUBECONFIG / ~/.kube/config
    context: str | None = None
    namespace: str = "corral-sandboxes"
    # isolation -> RuntimeClass (None: the cluster's default runtime, e.g. runc; not isolation for hostile code)
    runtime_classes: Mapping[str, str | None] = field(
        default_factory=lambda: {"gvisor": "gvisor", "kata-fc": "kata-fc"}
    )
    isolation: str = "gvisor"  # the entry a sandbox asking for isolation "kubernetes" gets
    # isolation levels this runtime serves under their own names (each a runtime_classes entry): with
    # serves = ["gvisor", "kata-fc"], Sandbox.create(isolation="kata-fc") is a Pod with RuntimeClass kata-fc,
    # and the same code that asks for "gvisor" on one box gets gVisor in the cluster
    serves: tuple[str, ...] = ()
    default_image: str = "docker.io/library/python:3.12-slim"  # for templates that name no OCI image
    agent_image: str = f"ghcr.io/corral-sandbox/corral-agent:{AGENT_VERSION}"
    agent_port: int = 7070
    loader: str = "ld-linux-x86-64.so.2"  # the agent bundle's loader: the nodes' CPU architecture
    run_as_user: int = 1000
    read_only_root: bool = True
    warm_replicas: int = 0  # SandboxWarmPool size per blueprint; 0: every claim is a cold start
    server_pod_labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "corral"})
    server_namespace_labels: Mapping[str, str] | None = None  # set when Corral runs in another namespace
    secret_api: str = "/v1/Secret/secrets"  # noqa: S105 - a resource name; group/version/Kind/plural of the bootstrap Secrets
    ready_timeout: float = 300.0  # seconds for a claim to become Ready (image pulls on a cold node)
    # the cluster's DNS Pods, which sandboxes with network "internet" may query on port 53 (as the local
    # runtimes answer names under "internet" only). dns_pod_labels None: no DNS rule at all;
    # dns_namespace_labels None: the DNS Pods are in the sandboxes' own namespace
    dns_pod_labels: Mapping[str, str] | None = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    dns_namespace_labels: Mapping[str, str] | None = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "kube-system"}
    )

    def __post_init__(self) -> None:
        # with serves, ``isolation`` matters only if "kubernetes" is enabled too (checked at the first create)
        for level in self.serves or (self.isolation,):
            if level not in self.runtime_classes:
                raise InvalidRequest(
                    f"[runtime.kubernetes] names isolation {level!r}, which has no entry in runtime_classes"
                    f" (entries: {', '.join(sorted(self.runtime_classes)) or 'none'})"
                )

    @property
    def secret_resource(self) -> Api:
        group, version, kind, plural = self.secret_api.split("/")
        return (group, version, kind, plural)


def _rfc3339(when: float) -> str:
    """Kubernetes times have whole seconds: round up, so a deadline never comes early."""
    return dt.datetime.fromtimestamp(math.ceil(when), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _condition(obj: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _is_true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    cond = _condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


class KubernetesRuntime(KubernetesNetwork):
    name: ClassVar[str] = "kubernetes"
    # any Corral server with the cluster's credentials reaches any sandbox: not node-local
    capabilities: ClassVar[Capabilities] = Capabilities(
        pause=False, pause_refusal=_PAUSE_REFUSAL, checkpoint=False, snapshot_fs=False, resource_limits=True,
        network_policy=True, network_names=False,  # a NetworkPolicy per sandbox: addresses only
        egress_secrets=False,  # no egress proxy to substitute them
        pids_limit=False,  # a Pod spec has no pids limit: that is the kubelet's --pod-max-pids, node-wide
        rootfs=(RootfsKind.OCI_IMAGE,), node_local=False,
    )  # fmt: skip
    Options: ClassVar[type[KubernetesSettings]] = KubernetesSettings

    def __init__(self, config: RuntimeConfig, options: KubernetesSettings | None = None) -> None:
        self.config = config
        self.settings = options or KubernetesSettings()
        self._api: KubeApi | None = None
        self._secrets: dict[str, bytes] = {}  # blueprint name -> bootstrap secret (immutable Secrets)
        self._lock = anyio.Lock()

    # --- plumbing --------------------------------------------------------------------------------------------
    def api(self) -> KubeApi:
        if self._api is None:
            s = self.settings
            self._api = KubeApi.open(kubeconfig=s.kubeconfig, context=s.context, namespace=s.namespace)
        return self._api

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    def blueprint(
        self, *, image: str | None, limits: Limits, isolation: str | None = None
    ) -> objects.Blueprint:
        s = self.settings
        chosen = isolation or s.isolation
        if chosen not in s.runtime_classes:
            raise InvalidRequest(
                f"isolation {chosen!r} has no RuntimeClass in [runtime.kubernetes] runtime_classes"
                f" (known: {', '.join(sorted(s.runtime_classes))})"
            )
        return objects.Blueprint(
            image=image or s.default_image, runtime_class=s.runtime_classes[chosen], limits=limits,
            agent_image=s.agent_image, agent_port=s.agent_port, loader=s.loader, run_as_user=s.run_as_user,
            read_only_root=s.read_only_root, server_pod_labels=s.server_pod_labels,
            server_namespace_labels=s.server_namespace_labels,
        )  # fmt: skip

    # --- Runtime ---------------------------------------------------------------------------------------------
    async def check(self) -> None:
        api = self.api()
        for resource in (
            objects.CLAIM_API,
            objects.TEMPLATE_API,
            objects.POOL_API,
            objects.SANDBOX_API,
            NETPOL_API,
        ):
            await api.list(resource, {objects.LABEL_MANAGED: "corral", "corral.dev/probe": "none"})

    async def create(self, spec: SandboxSpec) -> Instance:
        if not isinstance(spec.rootfs, OciImage):
            raise InvalidRequest(f"the kubernetes runtime runs OCI images, not {spec.rootfs.kind}")
        if spec.upper_seed is not None or spec.restore_from is not None:
            raise Unsupported("the kubernetes runtime cannot start a sandbox from a snapshot")
        image = spec.rootfs.reference
        if spec.rootfs.digest is not None:  # pin what the template was built from
            image = f"{image.split('@')[0]}@{spec.rootfs.digest}"
        # "kubernetes" (or a spec from older code, "") is the default entry; a served level is its own entry
        level = spec.isolation if spec.isolation in self.settings.serves else None
        bp = self.blueprint(image=image, limits=spec.limits, isolation=level)
        name = str(spec.sandbox_id)
        if spec.egress_secrets:
            raise Unsupported("the kubernetes runtime has no egress proxy to put secrets into requests")
        # refused (host names) before anything is made
        self.egress_manifest(name, bp.name, spec.network, owner=None)
        api = self.api()
        await self.ensure_blueprint(bp)
        shutdown = _rfc3339(spec.deadline) if spec.deadline is not None else None
        claimed = await api.create(
            objects.CLAIM_API,
            objects.claim(name, bp, api.namespace, node=self.config.node, shutdown_time=shutdown),
        )
        instance = Instance(
            sandbox_id=spec.sandbox_id, runtime=self.name, node=self.config.node, ref=f"{api.namespace}/{name}",
            extra={"claim": name, "blueprint": bp.name, "salt": auth.new_salt()},
        )  # fmt: skip
        try:
            if spec.network.enabled:  # before the Pod can run: the sandbox has its egress when create returns
                owner = objects.owner_reference(claimed)
                await api.create(NETPOL_API, self.egress_manifest(name, bp.name, spec.network, owner=owner))
            sandbox_name, ip = await self._wait_bound(name)
            instance = dataclasses.replace(
                instance, extra={**instance.extra, "sandbox": sandbox_name, "pod_ip": ip}
            )
            stream = await self._dial_new(instance, bp.name, ip)
            await stream.aclose()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.destroy(instance)
            raise
        return instance

    async def connect(self, instance: Instance) -> ByteStream:
        secret = auth.derive(await self._bootstrap(instance.extra["blueprint"]), instance.extra["salt"])
        ip = str(instance.extra.get("pod_ip"))
        try:
            return await dial_tcp(ip, self.settings.agent_port, secret)
        except AgentUnavailable:
            current = await self._pod_ip(instance)  # the Pod may have moved (resume made a new one)
            if current is None:
                raise AgentUnavailable(f"sandbox {instance.sandbox_id} has no running Pod") from None
            if current == ip:
                raise
            return await dial_tcp(current, self.settings.agent_port, secret)

    async def pause(self, instance: Instance) -> None:
        raise Unsupported(f"the kubernetes runtime cannot pause a sandbox: {_PAUSE_REFUSAL}")

    async def resume(self, instance: Instance) -> None:
        raise Unsupported("the kubernetes runtime cannot pause or resume sandboxes")

    async def snapshot(self, instance: Instance, key: str) -> Snapshot:
        raise Unsupported("the kubernetes runtime cannot snapshot sandboxes")

    async def discard(self, snapshot: Snapshot) -> None:
        raise Unsupported("the kubernetes runtime makes no snapshots")

    async def destroy(self, instance: Instance) -> None:
        """Delete the claim; agent-sandbox deletes its Sandbox and Pod. Idempotent."""
        with anyio.CancelScope(shield=True):
            claim = instance.extra["claim"]
            await self.api().patch(
                objects.CLAIM_API, claim, {"metadata": {"finalizers": None}}, missing_ok=True
            )
            await self.api().delete(objects.CLAIM_API, claim)
            sandbox = instance.extra.get("sandbox")
            if sandbox:  # a claim whose controller is gone would leave it; delete it ourselves too
                await self.api().delete(objects.SANDBOX_API, sandbox)
            # owned by the claim, so the garbage collector would delete it too; not waited for
            await self.api().delete(NETPOL_API, claim)

    async def inspect(self, instance: Instance) -> Observed:
        api = self.api()
        claim = await api.get(objects.CLAIM_API, instance.extra["claim"])
        if claim is None:
            return Observed(state=ObservedState.MISSING, reason="missing")
        deleted = claim["metadata"].get("deletionTimestamp")
        if deleted:  # held by Corral's finalizer: who deleted it, the deadline or someone else?
            shutdown = (claim["spec"].get("lifecycle") or {}).get("shutdownTime")
            if shutdown and _parse_time(deleted) >= _parse_time(shutdown):
                return Observed(state=ObservedState.EXITED, reason="deadline")
            return Observed(state=ObservedState.MISSING, reason="missing")
        name = ((claim.get("status") or {}).get("sandbox") or {}).get("name") or instance.extra.get("sandbox")
        sandbox = await api.get(objects.SANDBOX_API, name) if name else None
        if sandbox is None:
            return Observed(state=ObservedState.MISSING, reason="missing")
        if _is_true(sandbox, "Suspended"):
            return Observed(state=ObservedState.PAUSED)
        ready = _condition(sandbox, "Ready") or {}
        reason = ready.get("reason")
        if reason == "SandboxExpired":
            return Observed(state=ObservedState.EXITED, reason="deadline")
        if reason in ("PodFailed", "PodSucceeded"):
            return Observed(state=ObservedState.EXITED, reason="crashed")
        return Observed(state=ObservedState.RUNNING)

    async def set_deadline(self, instance: Instance, deadline: float | None) -> None:
        """The claim's shutdownTime (policy Delete): the cluster ends the sandbox then, Corral running or not."""
        lifecycle: dict[str, Any] = {"shutdownTime": _rfc3339(deadline) if deadline else None}
        if deadline:
            lifecycle["shutdownPolicy"] = "Delete"
        await self.api().patch(objects.CLAIM_API, instance.extra["claim"], {"spec": {"lifecycle": lifecycle}})

    # --- blueprints ------------------------------------------------------------------------------------------
    async def ensure_blueprint(self, bp: objects.Blueprint) -> None:
        """Template, bootstrap Secret and warm pool for ``bp``; each made once, by whichever server is first.

        On failure the objects this call made are deleted again (those another server made stay)."""
        if bp.name in self._secrets:
            return
        async with self._lock:
            if bp.name in self._secrets:
                return
            ns = self.api().namespace
            made: list[tuple[Api, str]] = []
            try:
                template = await self._create_or_get(objects.TEMPLATE_API, objects.template(bp, ns), made)
                value = os.urandom(32)
                owner = objects.owner_reference(template)
                secret = objects.secret(bp, ns, value, self.settings.secret_resource, owner)
                await self._create_or_get(self.settings.secret_resource, secret, made)
                pool = objects.warm_pool(bp, ns, self.settings.warm_replicas)
                await self._create_or_get(objects.POOL_API, pool, made)
                await self._bootstrap(bp.name)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    for api, name in reversed(made):
                        await self.api().delete(api, name)
                raise

    async def _create_or_get(
        self, api: Api, obj: Mapping[str, Any], made: list[tuple[Api, str]]
    ) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        try:
            created = await self.api().create(api, obj)
        except Conflict:  # another server (or an earlier run) made it: same name, same blueprint
            found = await self.api().get(api, name)
            if found is None:
                raise RuntimeFailure(f"Kubernetes: {api[2]} {name} keeps changing") from None
            return found
        made.append((api, name))
        return created

    async def _bootstrap(self, blueprint: str) -> bytes:
        cached = self._secrets.get(blueprint)
        if cached is not None:
            return cached
        import base64

        found = await self.api().get(self.settings.secret_resource, f"{blueprint}-agent")
        data = ((found or {}).get("data") or {}).get(objects.BOOTSTRAP_KEY)
        if not data:
            raise AgentUnavailable(
                f"the agent secret of blueprint {blueprint} is gone; its sandboxes cannot be reached"
            )
        value = base64.b64decode(data)
        self._secrets[blueprint] = value
        return value

    async def prune(self) -> list[str]:
        """Delete every blueprint (template, pool, Secret) no claim uses any more, and NetworkPolicies of
        claims that are gone; returns the blueprints' names."""
        api = self.api()
        managed = {objects.LABEL_MANAGED: "corral"}
        # NetworkPolicies of claims that are gone (the garbage collector's job too). Listed before the claims,
        # so one made (after its claim) while this runs is never taken for an orphan.
        policies = await api.list(NETPOL_API, managed)
        listed = await api.list(objects.CLAIM_API, managed)
        used = {c["metadata"]["labels"].get(objects.LABEL_BLUEPRINT) for c in listed}
        claims = {c["metadata"]["name"] for c in listed}
        for pol in policies:
            if pol["metadata"]["name"] not in claims:
                await api.delete(NETPOL_API, pol["metadata"]["name"])
        pruned = []
        for tpl in await api.list(objects.TEMPLATE_API, managed):
            name = tpl["metadata"]["name"]
            if name in used:
                continue
            await api.delete(objects.POOL_API, name)
            await api.delete(self.settings.secret_resource, f"{name}-agent")
            await api.delete(objects.TEMPLATE_API, name)
            self._secrets.pop(name, None)
            pruned.append(name)
        return pruned

    # --- waiting and dialling --------------------------------------------------------------------------------
    async def _wait_bound(self, claim: str) -> tuple[str, str]:
        """Wait (on a watch) until the claim is bound to a Ready Sandbox; return its name and Pod IP."""

        def bound(obj: dict[str, Any]) -> tuple[str, str] | None:
            ready = _condition(obj, "Ready") or {}
            if ready.get("status") == "False" and ready.get("reason") in _FATAL_CLAIM_REASONS:
                raise RuntimeFailure(
                    f"agent-sandbox could not start sandbox {claim}: {ready.get('reason')}: {ready.get('message', '')}"
                )
            status = (obj.get("status") or {}).get("sandbox") or {}
            if ready.get("status") != "True" or not status.get("name") or not status.get("podIPs"):
                return None
            return status["name"], status["podIPs"][0]

        try:
            return await self.api().wait_for(
                objects.CLAIM_API, claim, bound, timeout=self.settings.ready_timeout,
                what=f"SandboxClaim {claim} becoming Ready",
            )  # fmt: skip
        except Gone:
            raise RuntimeFailure(f"SandboxClaim {claim} was deleted while it was starting") from None

    async def _dial_new(self, instance: Instance, blueprint: str, ip: str) -> ByteStream:
        """First connection: rekey the Pod from its pool's secret to the sandbox's own."""
        bootstrap = await self._bootstrap(blueprint)
        salt = instance.extra["salt"]
        try:
            return await dial_tcp(ip, self.settings.agent_port, bootstrap, rekey=salt)
        except AgentUnavailable as exc:
            if not auth_refused(exc):
                raise
            # a rekey whose answer we lost: the Pod already holds the derived secret
            return await dial_tcp(ip, self.settings.agent_port, auth.derive(bootstrap, salt))

    async def _pod_ip(self, instance: Instance) -> str | None:
        sandbox = await self.api().get(objects.SANDBOX_API, instance.extra.get("sandbox", ""))
        ips = ((sandbox or {}).get("status") or {}).get("podIPs") or []
        return str(ips[0]) if ips else None
