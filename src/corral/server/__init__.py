"""The Corral HTTP server: thin adapters over :class:`~corral.core.service.SandboxService` (DESIGN §1).

Each route parses its input (pydantic models with unknown fields refused), calls the service with the caller's
tenant, and serialises the answer; errors leave as ``{"error": {"code", "message", "details"}}`` with the
status their class carries. Long outputs stream (NDJSON, WebSocket, raw file bodies); nothing buffers a whole
file or command output.
"""

from corral.server.app import create_app

__all__ = ["create_app"]
