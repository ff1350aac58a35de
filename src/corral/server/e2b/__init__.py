"""E2B compatibility: unchanged ``e2b`` / ``e2b-code-interpreter`` SDK code runs against ``corral serve``.

A second adapter over the same :class:`~corral.core.service.SandboxService` as Corral's own routes, never a
second implementation of sandbox semantics:

- ``sandboxes`` and ``snapshots``: E2B's REST control plane (``/sandboxes``, ``/v2/sandboxes``, ``/snapshots``,
  ``/templates/{id}``), authenticated by an ordinary tenant API key in ``X-API-Key`` (Corral's form, or E2B's
  ``e2b_`` + hex form that ``corral keys create --e2b`` makes), with E2B's ``{code, message}`` errors;
  ``metrics``: the service's resource samples in E2B's shape; ``network``: E2B's egress options as Corral
  egress policies;
- ``envd``: the in-sandbox API on the sandbox URL (Connect-RPC process and filesystem, ``/files``, the code
  interpreter), authenticated by the sandbox's own ``envdAccessToken``
  (:meth:`~corral.core.service.SandboxService.authenticate_envd`).
"""

from __future__ import annotations

from fastapi import FastAPI

from corral.server.e2b._wire import ENVD_VERSION

__all__ = ["ENVD_VERSION", "install"]


def install(app: FastAPI) -> None:
    """Add E2B's REST routes to Corral's app (their paths never collide with Corral's ``/v1/…``)."""
    from corral.server.e2b import metrics, sandboxes, snapshots

    app.include_router(sandboxes.router)
    app.include_router(snapshots.router)
    app.include_router(metrics.router)
