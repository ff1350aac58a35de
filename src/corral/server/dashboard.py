"""The web dashboard at ``/ui``: static files shipped in the package (``corral/server/ui``), no network at
run time, and a browser client of the same REST API as every other (it holds no privilege of its own).

The files are served with headers that keep anything else from scripting or framing them: a Content-Security
-Policy that allows only this origin's own scripts, styles and API (no inline script, no eval, nothing from
another host), ``frame-ancestors 'none'``, ``nosniff``, ``no-referrer`` and a same-origin opener and resource
policy. The dashboard's origin is never a sandbox port's: requests for ``{port}-{id}.{domain}`` are relayed
by the port proxy before routing (server/proxy.py), and ``/ui`` also refuses any host name under the ports
domain or the E2B domain (``api.{domain}`` included, a sibling of sandbox hosts), so a page served from a
sandbox port can neither be the dashboard nor share its storage.
"""

from __future__ import annotations

import mimetypes
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from corral.errors import NotFound
from corral.server.app import State

__all__ = ["SECURITY_HEADERS", "router"]

router = APIRouter(include_in_schema=False)

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # xterm.js writes its cell metrics and theme into <style> elements it creates (no nonce support), so
        # style elements may be inline; style attributes (markup injection's usual vehicle) may not.
        "style-src-elem 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
}
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html"}


def _root() -> Traversable:
    return resources.files("corral.server").joinpath("ui")


def _under_ports_domain(host: str, ports_domain: str) -> bool:
    name = host.rsplit(":", 1)[0].lower().rstrip(".") if not host.startswith("[") else host
    domain = ports_domain.rsplit(":", 1)[0].lower().rstrip(".")
    return bool(domain) and name.endswith("." + domain)


def _file(request: Request, state: State, path: str) -> Response:
    host = request.headers.get("host", "")
    if any(
        _under_ports_domain(host, d) for d in (state.settings.ports_domain, state.settings.e2b_domain) if d
    ):
        raise NotFound("the dashboard is not served on sandbox port host names; open it on the API's address")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") or "\\" in p for p in parts):
        raise NotFound(f"no dashboard file {path!r}")
    node = _root()
    for part in parts:
        node = node.joinpath(part)
    if not node.is_file():
        raise NotFound(f"no dashboard file {path!r}")
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    media = _TYPES.get(suffix) or mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
    cache = "no-cache" if suffix == ".html" else "public, max-age=300"
    headers = {**SECURITY_HEADERS, "cache-control": cache}
    return Response(node.read_bytes(), media_type=media, headers=headers)


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308, headers=SECURITY_HEADERS)


@router.api_route("/ui/", methods=["GET", "HEAD"])
async def ui_index(request: Request, state: State) -> Response:
    return _file(request, state, "index.html")


@router.api_route("/ui/{path:path}", methods=["GET", "HEAD"])
async def ui_asset(path: str, request: Request, state: State) -> Response:
    return _file(request, state, path)
