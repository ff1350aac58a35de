"""envd, the daemon E2B's SDK talks to on a sandbox's port 49983, and the code interpreter on 49999.

Corral has no envd inside its sandboxes: this package speaks envd's protocols at the server and maps every
request onto :class:`~corral.core.service.SandboxService` (which the agent inside the sandbox then carries
out), so the E2B surface and Corral's own API share one implementation of sandbox semantics.

- ``process.Process`` and ``filesystem.Filesystem``: Connect-RPC (:mod:`.process`, :mod:`.filesystem`).
- ``/files``, ``/health``, ``/envs``, ``/init``: :mod:`.files`.
- The code interpreter's ``/execute`` and ``/contexts``: :mod:`.interpreter`.

Requests arrive already routed and authenticated by :mod:`corral.server.e2b.sandbox_host`, as a
:class:`~._access.SandboxCall` (sandbox, tenant).
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from corral.errors import CorralError
from corral.server.e2b.envd import files, filesystem, interpreter, process
from corral.server.e2b.envd._access import SandboxAccess, SandboxCall, explained
from corral.server.e2b.envd._connect import serve
from corral.server.e2b.envd.watchers import Watchers

__all__ = ["SandboxAccess", "SandboxCall", "Watchers", "serve_envd", "serve_interpreter"]


async def serve_envd(
    call: SandboxCall, watchers: Watchers, scope: Scope, receive: Receive, send: Send
) -> None:
    path: str = scope["path"]

    async def explain(exc: CorralError) -> CorralError:
        return await explained(call, exc)

    if path.startswith(f"/{process.SERVICE}/"):
        await serve(process.SERVICE, process.rpcs(call), scope, receive, send, explain=explain)
    elif path.startswith(f"/{filesystem.SERVICE}/"):
        await serve(
            filesystem.SERVICE, filesystem.rpcs(call, watchers), scope, receive, send, explain=explain
        )
    else:
        await files.handle(call, scope, receive, send)


async def serve_interpreter(call: SandboxCall, scope: Scope, receive: Receive, send: Send) -> None:
    await interpreter.handle(call, scope, receive, send)
