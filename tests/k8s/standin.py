"""STAND-IN for agent-sandbox's controller and the kubelet. Tests only.

The test API server stores and watches the agent-sandbox objects but runs nothing: no controller, no Pods.
This stand-in watches the same objects in one namespace and does, in a few lines each, what agent-sandbox's
controller (with ``--extensions``) and a kubelet would:

- SandboxWarmPool: keeps ``spec.replicas`` Sandboxes made from its template (labelled as the pool's).
- SandboxClaim: adopts a Ready warm Sandbox of its pool, else creates one named after the claim (cold start);
  writes ``status.sandbox`` and the Ready condition; ``WarmPoolNotFound`` / ``TemplateNotFound`` otherwise;
  enforces ``lifecycle.shutdownTime`` (policy Delete: the claim goes too); deleting a claim deletes its Sandbox
  (the garbage collector's job in a real cluster).
- Sandbox ("the Pod"): starts a REAL local sandbox (Corral's namespace runtime, the host template: images are
  not pulled), plays the init container (writes the bootstrap secret named by the Pod's Secret volume where
  the container expects it, owned by ``runAsUser``), runs the container's own ``command`` (Corral's agent on
  TCP) as that user, and gives the "Pod" an IP: a loopback address ``127.0.X.Y`` whose port is free, relayed
  into the sandbox's network namespace through the sandbox's stdio agent (``port.connect``). Once the agent
  listens (the readiness probe) it writes Ready and ``podIPs``. Deleting the Sandbox destroys it.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from corral.core import files
from corral.core.agent_client import AgentClient
from corral.core.ports import open_port
from corral.core.processes import attach, exec_stream
from corral.ids import SandboxId
from corral.models import EventKind, ExecParams
from corral.runtimes.base import HostLayers, Instance, Limits, Runtime, SandboxSpec
from corral.testing import run_command

log = logging.getLogger("tests.k8s.standin")
log.setLevel(logging.DEBUG)  # a failing test's captured log shows how far each "Pod" got

Sandbox = create_namespaced_resource("agents.x-k8s.io", "v1beta1", "Sandbox", "sandboxes")
Template = create_namespaced_resource(
    "extensions.agents.x-k8s.io", "v1beta1", "SandboxTemplate", "sandboxtemplates"
)
Pool = create_namespaced_resource(
    "extensions.agents.x-k8s.io", "v1beta1", "SandboxWarmPool", "sandboxwarmpools"
)
Claim = create_namespaced_resource("extensions.agents.x-k8s.io", "v1beta1", "SandboxClaim", "sandboxclaims")
Secret = create_namespaced_resource("standin.corral.test", "v1", "Secret", "secrets")
POOL_LABEL = "agents.x-k8s.io/warm-pool-sandbox"
# "Pod IPs" 127.0.X.Y from a random start per session (sessions share the machine): see _pod_listener
_ips = itertools.count(secrets.randbelow(250 * 250))
RESYNC_EVERY = 5.0  # s: a relist, as an informer's resync period
POD_START_TIMEOUT = 60  # s: a start still going then is reported failed (where it stuck), not left hanging


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(kind: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": _now()}  # fmt: skip


def _owner(obj: Any) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True}  # fmt: skip


def _owned_by(obj: Any, kind: str) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref["kind"] == kind:
            return str(ref["name"])
    return None


def _limits(amounts: dict[str, str]) -> Limits:
    """The container's resource limits as the kubelet applies them (cgroups): CPU and memory only."""
    cpu = amounts.get("cpu", "1")
    cpus = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    memory = amounts.get("memory", "512Mi")
    assert memory.endswith("Mi"), memory
    return Limits(cpus=cpus, memory_mb=int(memory[:-2]))


async def _pod_listener(port: int) -> tuple[str, Any]:
    """The "Pod IP": the next loopback address whose ``port`` is free, with its listener bound.

    The counter is per test session, but the machine is shared: another session's stand-in (or anything
    else) may hold ``127.0.0.N:port`` right now. Binding first and advertising only an address we hold is
    what keeps two runs from handing out the same "Pod IP" (the cause of claims that never became Ready)."""
    for _ in range(64):
        n = next(_ips)
        ip = f"127.0.{n // 250 % 250}.{n % 250 + 2}"
        try:
            return ip, await anyio.create_tcp_listener(local_host=ip, local_port=port)
        except OSError:
            continue
    raise RuntimeError(f"stand-in: no free loopback address for port {port}")


@dataclass
class _Exit:
    event: anyio.Event = field(default_factory=anyio.Event)
    code: int | None = None
    output: bytes = b""


@dataclass
class _Pod:
    instance: Instance
    client: AgentClient
    ip: str
    cancel: anyio.CancelScope  # the relay's
    watch: anyio.CancelScope = field(default_factory=anyio.CancelScope)  # the container watch's


class StandInController:
    """Run with ``async with controller.running():``; it stops and destroys every local sandbox on exit."""

    def __init__(self, *, kubeconfig: Path, namespace: str, runtime: Runtime, rootfs: HostLayers) -> None:
        self.namespace = namespace
        self.runtime = runtime
        self.rootfs = rootfs
        config = KubeConfig.from_file(str(kubeconfig))
        self.k8s = AsyncClient(config, namespace=namespace, field_manager="standin", trust_env=False)
        self.pods: dict[str, _Pod] = {}
        self.starting: set[str] = set()
        self.doomed: set[str] = set()  # deleted while still starting
        self.failed: set[str] = set()  # restartPolicy Never: a Pod that failed is not started again
        self.started = 0  # local sandboxes started, for tests that tell warm from cold
        self._tg: TaskGroup | None = None
        self._pool_lock = anyio.Lock()
        self._changed = anyio.Condition()
        self._expiries: dict[str, tuple[str, anyio.CancelScope]] = {}

    # --- lifecycle -------------------------------------------------------------------------------------------
    def running(self) -> Any:
        controller = self

        class _Running:
            async def __aenter__(self) -> StandInController:
                controller._tg = anyio.create_task_group()
                await controller._tg.__aenter__()
                for res, handler in ((Pool, controller._on_pool), (Claim, controller._on_claim),
                                     (Sandbox, controller._on_sandbox)):  # fmt: skip
                    controller._tg.start_soon(controller._watch, res, handler)
                return controller

            async def __aexit__(self, *exc: object) -> None:
                assert controller._tg is not None
                controller._tg.cancel_scope.cancel()
                try:
                    await controller._tg.__aexit__(None, None, None)
                finally:  # a task that failed must not leave its local sandboxes running
                    with anyio.CancelScope(shield=True):
                        for name in list(controller.pods):
                            await controller._stop_pod(name)
                        await controller.k8s.close()

        return _Running()

    async def _watch(self, res: Any, handler: Callable[[str, dict[str, Any]], Any]) -> None:
        """An informer: the watch's events and a relist every RESYNC_EVERY s, handled one at a time in order
        (a change a watch missed is still acted on; handlers look the object up again before they act)."""
        send, receive = anyio.create_memory_object_stream[tuple[str, dict[str, Any]]](math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._events, res, send)
            tg.start_soon(self._resync, res, send)
            async for event, obj in receive:
                try:
                    await handler(event, obj)
                except ApiError as exc:  # a conflict or a vanished object: the next event repairs it
                    log.debug("stand-in: %s on %s", exc.status.code, res.__name__)
                except Exception:
                    log.exception("stand-in: handling %s %s failed", event, res.__name__)

    async def _events(self, res: Any, send: Any) -> None:
        while True:  # a watch cut by an API server restart is simply opened again (list + watch)
            try:
                async for event, obj in self.k8s.watch(res, namespace=self.namespace):
                    send.send_nowait((event, dict(obj.to_dict())))
            except Exception as exc:
                log.debug("stand-in: watch on %s ended (%s); again", res.__name__, exc)
                await anyio.sleep(0.2)

    async def _resync(self, res: Any, send: Any) -> None:
        while True:
            await anyio.sleep(RESYNC_EVERY)
            try:
                for obj in [o async for o in self.k8s.list(res, namespace=self.namespace)]:
                    send.send_nowait(("SYNC", dict(obj.to_dict())))
            except Exception as exc:
                log.debug("stand-in: relist of %s failed (%s)", res.__name__, exc)

    async def _get(self, res: Any, name: str) -> dict[str, Any] | None:
        try:
            return dict((await self.k8s.get(res, name)).to_dict())
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def _delete(self, res: Any, name: str) -> None:
        try:
            await self.k8s.delete(res, name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def _status(self, res: Any, name: str, status: dict[str, Any]) -> None:
        await self.k8s.patch(res.Status, name, {"status": status}, patch_type=PatchType.MERGE)

    # --- warm pools ------------------------------------------------------------------------------------------
    async def _on_pool(self, event: str, pool: dict[str, Any]) -> None:
        name = pool["metadata"]["name"]
        if event != "DELETED":
            await self._fill(name)
            return
        for sandbox in [s async for s in self.k8s.list(Sandbox, labels={POOL_LABEL: name})]:
            await self._delete(Sandbox, sandbox["metadata"]["name"])  # the garbage collector's part

    async def warm(self, pool: str, timeout: float = 60) -> None:
        """Wait until the pool has a Ready Sandbox (nothing else tells: a real pool's status would)."""
        with anyio.fail_after(timeout):
            while True:
                members = [dict(s.to_dict()) async for s in self.k8s.list(Sandbox, labels={POOL_LABEL: pool})]
                if any(self._ready(m) for m in members):
                    return
                # a change may land between the look and the wait: look again at least every second
                with anyio.move_on_after(1):
                    async with self._changed:
                        await self._changed.wait()

    async def settled(self, timeout: float = 60) -> None:
        """Wait until no local sandbox runs or starts and no Sandbox outlives its owner (the garbage
        collector's part, done on the owner's DELETED event, lands after the delete that caused it)."""
        with anyio.fail_after(timeout):
            while self.pods or self.starting or await self._orphans():
                # a change may land between the look and the wait: look again at least every second
                with anyio.move_on_after(1):
                    async with self._changed:
                        await self._changed.wait()

    async def _orphans(self) -> list[str]:
        owners = {"SandboxClaim": Claim, "SandboxWarmPool": Pool}
        found = []
        for sandbox in [dict(s.to_dict()) async for s in self.k8s.list(Sandbox)]:
            for ref in sandbox["metadata"].get("ownerReferences") or []:
                if ref["kind"] in owners and await self._get(owners[ref["kind"]], ref["name"]) is None:
                    found.append(sandbox["metadata"]["name"])
        return found

    async def _fill(self, pool_name: str) -> None:
        async with self._pool_lock:
            pool = await self._get(Pool, pool_name)
            if pool is None:
                return
            members = [s async for s in self.k8s.list(Sandbox, labels={POOL_LABEL: pool_name})]
            template = await self._get(Template, pool["spec"]["sandboxTemplateRef"]["name"])
            if template is None:
                return
            for _ in range(pool["spec"].get("replicas", 1) - len(members)):
                await self._make_sandbox(
                    f"{pool_name}-{secrets.token_hex(3)}", template, pool, {POOL_LABEL: pool_name}
                )

    async def _make_sandbox(
        self, name: str, template: dict[str, Any], owner: dict[str, Any], labels: dict[str, str]
    ) -> None:
        body = {"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
                "metadata": {"name": name, "labels": labels, "ownerReferences": [_owner(owner)]},
                "spec": {"podTemplate": template["spec"]["podTemplate"]}}  # fmt: skip
        await self.k8s.create(Sandbox.from_dict(body))

    # --- claims ----------------------------------------------------------------------------------------------
    async def _on_claim(self, event: str, claim: dict[str, Any]) -> None:
        name = claim["metadata"]["name"]
        if event != "SYNC":
            log.debug("stand-in: claim %s %s status=%s", name, event, claim.get("status"))
        if event == "DELETED":  # the garbage collector's part: the claim's Sandbox goes with it
            for sandbox in [s async for s in self.k8s.list(Sandbox)]:
                if _owned_by(sandbox, "SandboxClaim") == name:
                    await self._delete(Sandbox, sandbox["metadata"]["name"])
            return
        current = await self._get(Claim, name)  # the event may be older than what was done since
        if current is None:
            return
        claim = current
        if claim["metadata"].get("deletionTimestamp"):  # deleted, held by a finalizer: its Sandbox goes now
            for sandbox in [s async for s in self.k8s.list(Sandbox)]:
                if _owned_by(sandbox, "SandboxClaim") == name:
                    await self._delete(Sandbox, sandbox["metadata"]["name"])
            self._schedule_expiry(name, None)
            return
        self._schedule_expiry(name, (claim["spec"].get("lifecycle") or {}).get("shutdownTime"))
        status = claim.get("status") or {}
        if (status.get("sandbox") or {}).get("name"):
            return
        pool_name = claim["spec"]["warmPoolRef"]["name"]
        pool = await self._get(Pool, pool_name)
        template = await self._get(
            Template, (pool or {}).get("spec", {}).get("sandboxTemplateRef", {}).get("name", "")
        )
        if pool is None or template is None:
            reason = "WarmPoolNotFound" if pool is None else "TemplateNotFound"
            await self._status(
                Claim, name, {"conditions": [_cond("Ready", False, reason, f"{pool_name} not found")]}
            )
            return
        async with self._pool_lock:
            warm = [s async for s in self.k8s.list(Sandbox, labels={POOL_LABEL: pool_name})]
            ready = [
                dict(s.to_dict())
                for s in warm
                if name not in self.starting and self._ready(dict(s.to_dict()))
            ]
            if ready:  # adopt: the claim owns it now, it leaves the pool
                chosen = ready[0]["metadata"]["name"]
                patch = {"metadata": {"labels": {POOL_LABEL: None}, "ownerReferences": [_owner(claim)]}}
                await self.k8s.patch(Sandbox, chosen, patch, patch_type=PatchType.MERGE)
            else:
                chosen = name
                await self._make_sandbox(chosen, template, claim, {"agents.x-k8s.io/launch-type": "cold"})
        await self._status(Claim, name, {"sandbox": {"name": chosen},
                                         "conditions": [_cond("Ready", False, "SandboxNotReady")]})  # fmt: skip
        await self._fill(pool_name)
        sandbox = await self._get(Sandbox, chosen)
        if sandbox is not None and self._ready(sandbox):
            await self._claim_ready(name, sandbox)

    async def _claim_ready(self, claim: str, sandbox: dict[str, Any]) -> None:
        ips = sandbox["status"]["podIPs"]
        await self._status(Claim, claim, {"sandbox": {"name": sandbox["metadata"]["name"], "podIPs": ips},
                                          "conditions": [_cond("Ready", True, "SandboxReady")]})  # fmt: skip

    def _schedule_expiry(self, claim: str, when: str | None) -> None:
        """lifecycle.shutdownTime (policy Delete): one timer per claim, moved when the time changes."""
        current = self._expiries.get(claim)
        if current is not None and current[0] == when:
            return
        if current is not None:
            current[1].cancel()
            del self._expiries[claim]
        if when is None:
            return
        scope = anyio.CancelScope()
        self._expiries[claim] = (when, scope)
        assert self._tg is not None
        self._tg.start_soon(self._expire, claim, when, scope)

    async def _expire(self, claim: str, when: str, scope: anyio.CancelScope) -> None:
        deadline = dt.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
        with scope:
            await anyio.sleep(max(0.0, deadline - time.time()))  # a timer, as the controller's requeue-after
            self._expiries.pop(claim, None)
            await self._delete(Claim, claim)

    @staticmethod
    def _ready(sandbox: dict[str, Any]) -> bool:
        conds = (sandbox.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    # --- sandboxes: the "kubelet" ----------------------------------------------------------------------------
    async def _on_sandbox(self, event: str, sandbox: dict[str, Any]) -> None:
        name = sandbox["metadata"]["name"]
        if event != "SYNC":
            log.debug("stand-in: sandbox %s %s", name, event)
        if event == "DELETED":
            self.failed.discard(name)
            if name in self.starting:
                self.doomed.add(name)
            await self._stop_pod(name)
            pool = sandbox["metadata"].get("labels", {}).get(POOL_LABEL)
            if pool:
                await self._fill(pool)
            return
        if name not in self.pods and name not in self.starting and name not in self.failed:
            if await self._get(Sandbox, name) is None:  # an old event (a relist's) of one deleted since
                return
            if name in self.pods or name in self.starting:
                return
            self.starting.add(name)
            assert self._tg is not None
            self._tg.start_soon(self._start_pod, sandbox)

    async def _start_pod(self, sandbox: dict[str, Any]) -> None:
        name = sandbox["metadata"]["name"]
        steps = ["scheduled"]
        try:
            with anyio.fail_after(POD_START_TIMEOUT):
                await self._boot(sandbox, steps)
        except Exception as exc:  # a Pod that fails to start: what a kubelet reports, not a crash of ours
            if isinstance(exc, TimeoutError):
                exc = RuntimeError(f"the Pod did not start within {POD_START_TIMEOUT} s (stuck: {steps[-1]})")
            log.warning("stand-in: sandbox %s failed to start: %r", name, exc)
            self.failed.add(name)
            self.starting.discard(name)
            await self._stop_pod(name)
            try:
                await self._report_failure(name, repr(exc))
            except Exception:  # reporting must not take the whole controller down (its task group)
                log.exception("stand-in: could not report sandbox %s's failure", name)
        if name in self.doomed:
            self.doomed.discard(name)
            await self._stop_pod(name)

    async def _report_failure(self, name: str, message: str) -> None:
        current = await self._get(Sandbox, name)
        if current is not None:
            failed = [_cond("Ready", False, "PodFailed", message)]
            await self._status(Sandbox, name, {"conditions": failed})
            claim = _owned_by(current, "SandboxClaim")
            if claim is not None:  # agent-sandbox mirrors the Sandbox's failure onto its claim
                await self._status(Claim, claim, {"conditions": failed})

    async def _boot(self, sandbox: dict[str, Any], steps: list[str]) -> None:
        """Start the "Pod"; ``steps`` records how far it got (a start that hangs says where)."""
        name = sandbox["metadata"]["name"]
        pod = sandbox["spec"]["podTemplate"]["spec"]
        container = pod["containers"][0]
        limits = _limits(container.get("resources", {}).get("limits", {}))

        def step(what: str) -> None:
            steps.append(what)
            log.debug("stand-in: %s: %s", name, what)

        step("creating the local sandbox")
        instance = await self.runtime.create(
            SandboxSpec(sandbox_id=SandboxId.new(), rootfs=self.rootfs, limits=limits)
        )
        self.started += 1
        step(f"connecting to local sandbox {instance.sandbox_id}'s agent")
        client = await AgentClient.open(
            await self.runtime.connect(instance), sandbox_id=str(instance.sandbox_id)
        )
        port = container["ports"][0]["containerPort"]
        ip, listener = await _pod_listener(port)
        scope = anyio.CancelScope()
        self.pods[name] = running = _Pod(instance, client, ip, scope)
        self.starting.discard(name)
        step("the init container (bootstrap secret)")
        await self._init_container(client, pod, container)
        step("starting the container's command")
        user = "user" if pod["securityContext"].get("runAsUser", 0) != 0 else "root"
        process_id = None
        async for ev in exec_stream(
            client, ExecParams(argv=container["command"], user=user, background=True)
        ):  # read to the end (detached): a request left open holds frames meant for it
            process_id = ev.process_id or process_id
        assert process_id is not None, "the agent started no process"
        exited = _Exit()
        assert self._tg is not None
        self._tg.start_soon(self._watch_container, client, process_id, exited, name, running.watch)
        self._tg.start_soon(self._serve, listener, client, port, str(instance.sandbox_id), scope)
        step(f"the readiness probe (tcp {port})")
        await self._readiness(client, port, str(instance.sandbox_id), exited)
        step(f"ready at {ip}")
        if await self._get(Sandbox, name) is None or name not in self.pods:
            return  # deleted while starting: _on_sandbox's DELETED stops it
        await self._status(
            Sandbox, name, {"podIPs": [ip], "conditions": [_cond("Ready", True, "DependenciesReady")]}
        )
        async with self._changed:
            self._changed.notify_all()
        current = await self._get(Sandbox, name)
        claim = _owned_by(current, "SandboxClaim") if current else None
        if claim is not None and current is not None:
            await self._claim_ready(claim, current)

    async def _watch_container(
        self, client: AgentClient, process_id: str, exited: _Exit, name: str, scope: anyio.CancelScope
    ) -> None:
        """What the kubelet knows of the container: its output and how it ended (for a failed start)."""
        with scope:
            try:
                async for ev in attach(client, process_id):
                    if ev.kind in (EventKind.STDOUT, EventKind.STDERR):
                        exited.output = (exited.output + ev.data)[-2000:]
                    elif ev.kind is EventKind.EXIT:
                        exited.code = ev.exit_code if ev.signal is None else -ev.signal
            except Exception as exc:  # the sandbox went (the Pod was deleted): nothing more to know
                log.debug("stand-in: %s: container watch ended: %r", name, exc)
                return
            exited.event.set()
            log.warning("stand-in: %s: container exited %s: %r", name, exited.code, bytes(exited.output))

    async def _init_container(
        self, client: AgentClient, pod: dict[str, Any], container: dict[str, Any]
    ) -> None:
        """The bootstrap secret where the agent expects it (``--secret-file``), owned by the Pod's user."""
        secret_name = next(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v)
        secret = await self._get(Secret, secret_name)
        with anyio.fail_after(30):
            while secret is None:  # a kubelet retries a Secret volume it cannot mount yet
                await anyio.sleep(0.2)
                secret = await self._get(Secret, secret_name)
        ((_key, value),) = secret["data"].items()
        target = container["command"][container["command"].index("--secret-file") + 1]

        async def chunks() -> Any:
            yield base64.b64decode(value)

        await files.write(client, target, chunks(), max_bytes=4096, user="root")
        uid = pod["securityContext"]["runAsUser"]
        parent = target.rsplit("/", 1)[0]
        out = await run_command(client, ExecParams(argv=["chown", "-R", f"{uid}:{uid}", parent], user="root"))
        assert out[2].exit_code == 0, out

    async def _readiness(self, client: AgentClient, port: int, sandbox_id: str, exited: _Exit) -> None:
        """The Pod's readiness probe (tcpSocket on the agent port), until the container exits."""
        while not exited.event.is_set():
            try:
                stream = await open_port(client, port, sandbox_id=sandbox_id, timeout=5)
            except Exception:
                await anyio.sleep(0.02)  # the probe's period, shortened
                continue
            await stream.aclose()
            return
        raise RuntimeError(
            f"the container exited ({exited.code}) before it listened: {bytes(exited.output)[-500:]!r}"
        )

    async def _serve(
        self, listener: Any, client: AgentClient, port: int, sandbox_id: str, scope: anyio.CancelScope
    ) -> None:
        async def relay(conn: SocketStream) -> None:
            async with conn:
                try:
                    inner = await open_port(client, port, sandbox_id=sandbox_id)
                except Exception:
                    return
                async with inner, anyio.create_task_group() as tg:

                    async def up() -> None:
                        try:
                            async for chunk in conn:
                                await inner.send(chunk)
                            await inner.send_eof()
                        except Exception:
                            tg.cancel_scope.cancel()

                    tg.start_soon(up)
                    try:
                        async for chunk in inner:
                            await conn.send(chunk)
                    except Exception:
                        pass
                    tg.cancel_scope.cancel()

        with scope:
            async with listener:
                await listener.serve(relay)

    async def _stop_pod(self, name: str) -> None:
        pod = self.pods.pop(name, None)
        if pod is not None:
            pod.cancel.cancel()
            pod.watch.cancel()
            with anyio.CancelScope(shield=True):
                await pod.client.aclose()
                await self.runtime.destroy(pod.instance)
        async with self._changed:
            self._changed.notify_all()
