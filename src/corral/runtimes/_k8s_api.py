"""The Kubernetes API as the Kubernetes runtime uses it: a few verbs on plain dicts, errors translated once.

Built on lightkube's async client (httpx-based: kubeconfig or in-cluster credentials, watches, generic custom
resources). Objects are plain ``dict`` manifests in and out (:mod:`corral.runtimes._k8s_objects` builds them);
resources are named by ``(group, version, kind, plural)`` tuples, an empty group meaning the core API.

Waiting is event-driven: :meth:`KubeApi.wait_for` reads the object once, then watches it from that
``resourceVersion`` and re-evaluates a predicate on each change. When the API server goes away mid-watch (a
restart, a failover) the wait re-reads and watches again until its deadline; only then is it an error.

Errors (:func:`translate`): 409 → :class:`~corral.errors.Conflict`; 401/403 → a RuntimeFailure that says which
verb on which resource Corral's identity may not use and what to grant; 422 → a RuntimeFailure carrying the
server's field causes (Corral made a manifest the server rejects: a setting such as the image or a RuntimeClass
is wrong); 404 of a whole API group → RuntimeUnavailable (agent-sandbox is not installed); unreachable server
→ RuntimeFailure naming the server. Messages carry the API server's own text, which has no host paths.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio
import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.generic_resource import create_namespaced_resource

from corral.errors import Conflict, CorralError, RuntimeFailure, RuntimeUnavailable, Timeout

__all__ = ["Api", "Gone", "KubeApi", "translate"]

log = logging.getLogger("corral.runtimes.kubernetes")

Api = tuple[str, str, str, str]  # group, version, kind, plural
T = TypeVar("T")
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between re-watches after the API server dropped us
REQUEST_TIMEOUT = 30.0


class Gone(Exception):
    """The object waited on was deleted (or never existed)."""


class _Verdict(Exception):
    """Carries the error an ``accept`` of :meth:`KubeApi.wait_for` raised past the watch's retries."""

    def __init__(self, error: CorralError) -> None:
        super().__init__(error)
        self.error = error


def _describe(api: Api, name: str | None) -> str:
    return f"{api[2]} {name}" if name else api[3]


def translate(
    exc: BaseException, *, verb: str, api: Api, namespace: str, name: str | None = None
) -> CorralError:
    """One place where Kubernetes errors become Corral errors, with what to do about them."""
    what = _describe(api, name)
    resource = f"{api[3]}.{api[0]}" if api[0] else api[3]
    if isinstance(exc, ApiError | httpx2.HTTPStatusError):
        code, message, reason, causes = _status_of(exc)
        details = {"kubernetes": {"status": code, "reason": reason, "verb": verb, "resource": resource}}
        if code == 409:
            return Conflict(f"Kubernetes: {what} in {namespace}: {message}", details=details)
        if code in (401, 403):
            return RuntimeFailure(
                f"Kubernetes refused Corral's identity: it may not {verb} {resource} in namespace {namespace!r}"
                f" ({code} {reason}). Grant its ServiceAccount that verb (the Role in deploy/), or fix"
                " [runtime.kubernetes] kubeconfig.",
                details=details,
            )
        if code == 422:
            return RuntimeFailure(
                f"Kubernetes rejected the {what} Corral made: {'; '.join(causes) or message}. Check the"
                " template's image and [runtime.kubernetes] (runtime_classes, agent_image, warm_replicas).",
                details=details,
            )
        if code == 404 and name is None:
            return RuntimeUnavailable(
                f"the cluster does not serve {resource}: install agent-sandbox (its CRDs and controller, with"
                " --extensions) before using the kubernetes runtime",
                details=details,
            )
        return RuntimeFailure(f"Kubernetes: {verb} {what} failed: {code} {message}", details=details)
    if isinstance(exc, httpx2.HTTPError | OSError):
        return RuntimeFailure(
            f"the Kubernetes API server is unreachable ({type(exc).__name__}) while trying to {verb} {what};"
            " check [runtime.kubernetes] kubeconfig and the cluster",
            details={"kubernetes": {"verb": verb, "resource": resource}},
        )
    return RuntimeFailure(f"Kubernetes: {verb} {what} failed: {type(exc).__name__}")


def _status_of(exc: ApiError | httpx2.HTTPStatusError) -> tuple[int, str, str, list[str]]:
    """(code, message, reason, field causes) of an API error, whether or not its body was a Status."""
    if isinstance(exc, ApiError):
        st = exc.status
        causes = [f"{c.field}: {c.message}" for c in ((st.details.causes or []) if st.details else [])]
        return st.code or 0, st.message or "", st.reason or "", causes
    response = exc.response
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    found = (body.get("details") or {}).get("causes") or []
    causes = [f"{c.get('field')}: {c.get('message')}" for c in found]
    return response.status_code, str(body.get("message", "")), str(body.get("reason", "")), causes


async def _retrying(call: Callable[[], Any]) -> Any:
    """``call()``, again after a 429 (throttled, or a resource's storage re-initializing): the server asks
    for a retry, a few times with growing delays; any other error at once."""
    for delay in RETRY_DELAYS:
        try:
            return await call()
        except ApiError as exc:
            if exc.status.code != 429:
                raise
            await anyio.sleep(delay)
    return await call()


def _is_status(exc: BaseException, *codes: int) -> bool:
    if isinstance(exc, ApiError | httpx2.HTTPStatusError):
        return _status_of(exc)[0] in codes
    return False


class KubeApi:
    """One namespace of one cluster. Create with :meth:`open`; close with :meth:`aclose`."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    @classmethod
    def open(cls, *, kubeconfig: str | None, context: str | None, namespace: str) -> KubeApi:
        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            client = AsyncClient(
                config.get(context_name=context), namespace=namespace, timeout=httpx2.Timeout(REQUEST_TIMEOUT),
                field_manager="corral", trust_env=False,
            )  # fmt: skip
        except Exception as exc:  # lightkube raises ConfigError, OSError, yaml and key errors for bad files
            raise RuntimeUnavailable(
                f"cannot load Kubernetes credentials ({type(exc).__name__}: {exc}); set [runtime.kubernetes]"
                " kubeconfig, or run inside the cluster with a ServiceAccount"
            ) from exc
        return cls(client, namespace)

    async def aclose(self) -> None:
        await self.client.close()

    @staticmethod
    def resource(api: Api) -> Any:
        group, version, kind, plural = api
        return create_namespaced_resource(group, version, kind, plural)

    async def _call(self, verb: str, api: Api, name: str | None, call: Callable[[], Any]) -> Any:
        try:
            return await _retrying(call)
        except (ApiError, httpx2.HTTPError, OSError) as exc:
            raise translate(exc, verb=verb, api=api, namespace=self.namespace, name=name) from exc

    # --- verbs -----------------------------------------------------------------------------------------------
    async def create(self, api: Api, obj: Mapping[str, Any]) -> dict[str, Any]:
        res = self.resource(api)
        name = obj["metadata"]["name"]
        made = await self._call("create", api, name, lambda: self.client.create(res.from_dict(dict(obj))))
        return dict(made.to_dict())

    async def _on_object(self, verb: str, api: Api, name: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` when the object does not exist (a 404 Status about it,
        not a path the server does not serve: that is an error)."""
        try:
            return True, await _retrying(call)
        except ApiError as exc:
            if exc.status.code == 404 and exc.status.details is not None:
                return False, None
            raise translate(exc, verb=verb, api=api, namespace=self.namespace, name=name) from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise translate(exc, verb=verb, api=api, namespace=self.namespace, name=name) from exc

    async def get(self, api: Api, name: str) -> dict[str, Any] | None:
        res = self.resource(api)
        found, got = await self._on_object("get", api, name, lambda: self.client.get(res, name))
        return dict(got.to_dict()) if found else None

    async def list(self, api: Api, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        res = self.resource(api)

        async def collect() -> list[dict[str, Any]]:
            return [dict(o.to_dict()) async for o in self.client.list(res, labels=dict(labels))]

        result: list[dict[str, Any]] = await self._call("list", api, None, collect)
        return result

    async def patch(self, api: Api, name: str, patch: Mapping[str, Any], *, missing_ok: bool = False) -> bool:
        """A JSON merge patch; False when the object is gone and ``missing_ok``."""
        from lightkube.types import PatchType

        res = self.resource(api)
        found, _ = await self._on_object(
            "patch", api, name, lambda: self.client.patch(res, name, dict(patch), patch_type=PatchType.MERGE)
        )
        if not found and not missing_ok:
            raise RuntimeFailure(f"Kubernetes: {api[2]} {name} in {self.namespace} is gone")
        return found

    async def delete(self, api: Api, name: str) -> bool:
        """Delete; False when it was already gone. Idempotent.

        Background propagation: the object goes at once and the garbage collector removes its dependents
        (a foreground delete would leave it, finalized, until they are gone)."""
        res = self.resource(api)
        found, _ = await self._on_object("delete", api, name, lambda: self.client.delete(res, name))
        return found

    # --- waiting ---------------------------------------------------------------------------------------------
    async def wait_for(
        self, api: Api, name: str, accept: Callable[[dict[str, Any]], T | None], *, timeout: float, what: str
    ) -> T:
        """Return ``accept(obj)`` for the first version of the object for which it is not None.

        ``accept`` may raise to stop the wait (a failure condition). Raises :class:`Gone` if the object is
        deleted, :class:`~corral.errors.Timeout` after ``timeout`` seconds, naming ``what`` was awaited.
        """
        last: dict[str, Any] | None = None
        try:
            with anyio.fail_after(timeout):
                retries = 0
                while True:
                    try:
                        async for event, obj in self._watch(api, name):
                            retries = 0
                            last = obj
                            if event == "DELETED":
                                raise Gone(name)
                            try:
                                result = accept(obj)
                            except CorralError as exc:  # accept's verdict, not a failing watch: no retry
                                raise _Verdict(exc) from exc
                            if result is not None:
                                return result
                    except CorralError as exc:  # the server went away or refused mid-watch: look again
                        if not isinstance(exc, RuntimeFailure) or retries >= len(RETRY_DELAYS) * 4:
                            raise
                        log.info("watch on %s/%s interrupted (%s); watching again", api[3], name, exc)
                        await anyio.sleep(RETRY_DELAYS[min(retries, len(RETRY_DELAYS) - 1)])
                        retries += 1
        except _Verdict as verdict:
            raise verdict.error from None
        except TimeoutError:
            raise Timeout(
                f"{what} did not happen within {math.ceil(timeout)} s ({_conditions(last)})",
                details={"kubernetes": {"resource": api[3], "name": name}},
            ) from None

    async def _watch(self, api: Api, name: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The object now, then its changes (``ADDED``/``MODIFIED``/``DELETED``), from one resourceVersion."""
        current = await self.get(api, name)
        if current is None:
            raise Gone(name)
        yield "ADDED", current
        res = self.resource(api)
        version = current["metadata"].get("resourceVersion")
        stream: Any = self.client.watch(
            res, namespace=self.namespace, fields={"metadata.name": name}, resource_version=version
        )
        try:
            while True:
                try:
                    event, obj = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except (ApiError, httpx2.HTTPError, OSError) as exc:
                    if _is_status(exc, 410):  # our resourceVersion is too old: read again
                        return
                    raise translate(exc, verb="watch", api=api, namespace=self.namespace, name=name) from exc
                yield event, dict(obj.to_dict())
        finally:
            await stream.aclose()


def _conditions(obj: Mapping[str, Any] | None) -> str:
    if obj is None:
        return "the object was never seen"
    conds = (obj.get("status") or {}).get("conditions") or []
    if not conds:
        return "no status conditions yet"
    return "; ".join(
        f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}" for c in conds
    )
