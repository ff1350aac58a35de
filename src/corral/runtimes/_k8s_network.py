"""The kubernetes runtime's network methods (:class:`~corral.runtimes.base.NetworkController`): one
NetworkPolicy per sandbox with network, made from its Corral policy by :mod:`._k8s_netpol`.

A mixin of :class:`corral.runtimes.kubernetes.KubernetesRuntime`, which makes the policy at create and deletes
it at destroy and prune; here it is computed (:meth:`KubernetesNetwork.egress_manifest`) and replaced in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from corral.errors import Conflict, RuntimeFailure
from corral.netpolicy import NetworkPolicy
from corral.runtimes import _k8s_objects as objects
from corral.runtimes._k8s_netpol import NETPOL_API, egress_policy
from corral.runtimes.base import Instance, RuntimeConfig

if TYPE_CHECKING:
    from corral.runtimes._k8s_api import KubeApi
    from corral.runtimes.kubernetes import KubernetesSettings

__all__ = ["KubernetesNetwork"]


class KubernetesNetwork:
    """Egress by NetworkPolicy; needs the runtime's ``config``, ``settings`` and ``api()``."""

    config: RuntimeConfig
    settings: KubernetesSettings

    def api(self) -> KubeApi:  # the runtime's
        raise NotImplementedError

    def egress_manifest(
        self, name: str, blueprint: str, policy: NetworkPolicy, *, owner: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The sandbox's NetworkPolicy (Unsupported for name rules: :func:`._k8s_netpol.egress_policy`)."""
        s = self.settings
        dns: dict[str, Mapping[str, str]] | None = None
        if s.dns_pod_labels is not None:
            dns = {"pod": s.dns_pod_labels}
            if s.dns_namespace_labels is not None:
                dns["namespace"] = s.dns_namespace_labels
        labels = {
            objects.LABEL_MANAGED: "corral",
            objects.LABEL_SANDBOX: name,
            objects.LABEL_BLUEPRINT: blueprint,
        }
        return egress_policy(
            policy, name=name, namespace=s.namespace,
            selector={objects.LABEL_SANDBOX: name}, labels=labels, owner=owner,
            extra_denied=self.config.egress.denied_networks(), dns_peer=dns,
        )  # fmt: skip

    async def update_network(self, instance: Instance, policy: NetworkPolicy) -> int:
        """Replace the sandbox's NetworkPolicy (make it, from ``none``; delete it, to ``none``).

        Returns 0: Corral cuts no connection here. A NetworkPolicy decides new connections; whether the CNI
        also drops established ones a new policy denies is the CNI's behaviour, not Corral's."""
        api, name = self.api(), instance.extra["claim"]
        manifest = self.egress_manifest(name, instance.extra["blueprint"], policy, owner=None)
        if not policy.enabled:
            await api.delete(NETPOL_API, name)
            return 0
        if await api.patch(NETPOL_API, name, {"spec": manifest["spec"]}, missing_ok=True):
            return 0
        claim = await api.get(objects.CLAIM_API, name)
        if claim is None:
            raise RuntimeFailure(f"SandboxClaim {name} is gone; its sandbox has no network to change")
        manifest["metadata"]["ownerReferences"] = [objects.owner_reference(claim)]
        try:
            await api.create(NETPOL_API, manifest)
        except Conflict:  # a concurrent update made it between the patch and here: replace it as above
            await api.patch(NETPOL_API, name, {"spec": manifest["spec"]})
        return 0

    async def network_stats(self, instance: Instance) -> dict[str, Any]:
        """Nothing counted: the CNI decides each packet and keeps its own counters (Hubble, flow logs)."""
        return {"connections": 0, "totals": {}, "decisions": [], "dropped": {}}

    async def network_decisions(self, instance: Instance, offset: int) -> tuple[list[dict[str, Any]], int]:
        """No decision feed: a NetworkPolicy's verdicts stay in the CNI, so none reach the audit log."""
        return [], offset
