"""Template builds: a source (image, directory, tarball, debootstrap) plus ``--run`` steps → an ordered tuple of
shared read-only layers and the defaults sandboxes made from it start with.

1. The source becomes the bottom layers. An image is pulled (:mod:`.registry`: the blob cache makes a second
   pull download only the manifest) and each layer blob is unpacked once into the :class:`.LayerStore` under its
   digest; a tarball or a debootstrap run becomes one layer; a directory is used in place.
2. Each step runs in a sandbox (no network) whose root is the layers so far. When it exits 0 the sandbox's
   writable layer becomes a new layer, keyed by a hash of the layers under it, the step and the settings that
   change its meaning (env, workdir, user): rebuilding reuses it without running anything, and changing a step
   rebuilds it and everything above, as with a Dockerfile. The sandbox is provided by the core (a
   :class:`StepRunner`): this package never starts sandboxes itself.
3. Image config (env, workdir, user, entrypoint/cmd) carries over, under what the build sets explicitly.

Progress is reported through ``emit`` as :class:`~corral.models.BuildEvent` values, so the SDK can stream them
and the CLI can draw a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from corral.errors import InvalidRequest
from corral.images import registry as _registry
from corral.images import rootfs as _rootfs
from corral.images.layers import LayerStore
from corral.models import BuildEvent, BuildEventKind, BuildParams

__all__ = ["BuiltTemplate", "Emit", "SourceKind", "StepRunner", "TemplateDefaults", "build_layers"]

Emit = Callable[[BuildEvent], Awaitable[None]]
MAX_STEPS = 64
MAX_STEP_LEN = 16384


@dataclass(frozen=True, kw_only=True)
class TemplateDefaults:
    """What a sandbox made from the template starts with. ``cmd`` is the image's entrypoint + cmd, kept for
    reference (a sandbox's main process is the agent; ``start_cmd`` is what runs in the background)."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    cmd: list[str] = field(default_factory=list)
    start_cmd: str | None = None
    ready_cmd: str | None = None


@dataclass(frozen=True, kw_only=True)
class BuiltTemplate:
    kind: str  # "image", "directory", "tarball", "debootstrap"
    layers: tuple[Path, ...]  # topmost first (overlayfs order)
    layer_keys: tuple[str, ...]  # store keys of ``layers`` (a directory source has key "dir-…")
    defaults: TemplateDefaults


class StepRunner(Protocol):
    async def run_step(
        self,
        *,
        lowers: tuple[Path, ...],
        command: str,
        env: dict[str, str],
        workdir: str | None,
        user: str,
        dest: Path,
        output: Callable[[str], Awaitable[None]],
    ) -> int:
        """Run ``command`` in a throw-away sandbox over ``lowers`` (topmost first); when it exits 0, copy
        the sandbox's writable layer into ``dest`` (an empty directory). Returns the exit code."""


class SourceKind:
    IMAGE = "image"
    DIRECTORY = "directory"
    TARBALL = "tarball"
    DEBOOTSTRAP = "debootstrap"


def _image_user(user: str | None) -> str:
    """Images name users as docker does; the agent knows "root" and "user" (uid 1000)."""
    if not user:
        return "root"  # docker's default
    name = user.split(":", 1)[0]
    return "root" if name in ("root", "0") else "user"


def _check(params: BuildParams) -> None:
    if len(params.steps) > MAX_STEPS or any(
        not isinstance(s, str) or not s.strip() or len(s) > MAX_STEP_LEN for s in params.steps
    ):
        raise InvalidRequest(
            f"give at most {MAX_STEPS} non-empty --run steps of up to {MAX_STEP_LEN} characters"
        )
    if params.user not in (None, "root", "user"):
        raise InvalidRequest("user must be 'root' or 'user'")
    if params.workdir is not None and not params.workdir.startswith("/"):
        raise InvalidRequest("workdir must be an absolute path inside the sandbox")


async def build_layers(
    params: BuildParams, *, layers: LayerStore, layout: Path, runner: StepRunner, emit: Emit
) -> BuiltTemplate:
    """Make (or find) every layer of ``params``; see the module docstring. Nothing is left half-made on error."""
    _check(params)
    total = len(params.steps)
    source = params.source.strip()
    image_defaults = TemplateDefaults()
    if source.startswith("debootstrap:"):
        kind = SourceKind.DEBOOTSTRAP
        suite = source.partition(":")[2]
        await emit(BuildEvent(kind=BuildEventKind.PULL, message=f"debootstrap {suite}", total_steps=total))
        made = await anyio.to_thread.run_sync(_rootfs.debootstrap_layer, suite, layers)
        await emit(_layer_event(made.key, cached=not made.created, total=total))
        stack = [(made.key, made.path)]
    elif source.startswith(("/", ".")):
        path = await anyio.to_thread.run_sync(Path(source).resolve)
        if await anyio.to_thread.run_sync(path.is_dir):
            kind = SourceKind.DIRECTORY
            spec = _rootfs.rootfs_from_directory(path)
            key = "dir-" + hashlib.sha256(str(path).encode()).hexdigest()[:32]
            stack = [(key, spec.lower[0])]
            await emit(BuildEvent(kind=BuildEventKind.LAYER, message=path.name, layer=key, cached=True))
        else:
            kind = SourceKind.TARBALL
            made = await anyio.to_thread.run_sync(_rootfs.tarball_layer, path, layers)
            await emit(_layer_event(made.key, cached=not made.created, total=total))
            stack = [(made.key, made.path)]
    else:
        kind = SourceKind.IMAGE
        ref = _registry.ImageRef.parse(source)
        creds = None
        if params.registry_username or params.registry_token:
            creds = _registry.Credentials(
                username=params.registry_username,
                password=params.registry_password,
                token=params.registry_token,
            )
        await emit(BuildEvent(kind=BuildEventKind.PULL, message=f"pulling {ref}", total_steps=total))
        image = await anyio.to_thread.run_sync(
            lambda: _registry.pull(ref, layout, credentials=creds, insecure=params.insecure_registry)
        )
        stack = []
        for i, blob in enumerate(image.layers, 1):
            key = blob.digest.replace(":", "-")
            what = f"layer {i} of {ref}"
            made = await anyio.to_thread.run_sync(
                partial(layers.unpack, key, blob.path, compression=blob.compression, what=what)
            )
            await emit(_layer_event(made.key, cached=not made.created, total=total))
            stack.append((made.key, made.path))
        cfg = image.config
        image_defaults = TemplateDefaults(
            env=dict(cfg.env),
            workdir=cfg.workdir,
            user=_image_user(cfg.user),
            cmd=[*cfg.entrypoint, *cfg.cmd],
        )
    env = {**image_defaults.env, **params.env}
    workdir = params.workdir or image_defaults.workdir
    user = params.user or image_defaults.user or "root"
    for i, step in enumerate(params.steps, 1):
        digest = hashlib.sha256(
            json.dumps(
                {"parents": [k for k, _ in stack], "run": step, "env": env, "workdir": workdir, "user": user},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        key = f"step-{digest[:32]}"
        await emit(BuildEvent(kind=BuildEventKind.STEP, message=step, step=i, total_steps=total))
        found = layers.get(key)
        if found is None:
            found = await _run_step(
                runner,
                layers,
                key,
                step,
                i,
                total,
                stack=stack,
                env=env,
                workdir=workdir,
                user=user,
                emit=emit,
            )
            await emit(_layer_event(key, cached=False, total=total, step=i))
        else:
            await emit(_layer_event(key, cached=True, total=total, step=i))
        stack.append((key, found))
    defaults = TemplateDefaults(
        env=env,
        workdir=workdir,
        user=user if (params.user or kind == SourceKind.IMAGE) else None,
        cmd=image_defaults.cmd,
        start_cmd=params.start_cmd,
        ready_cmd=params.ready_cmd,
    )
    top_first = list(reversed(stack))
    return BuiltTemplate(
        kind=kind,
        layers=tuple(p for _, p in top_first),
        layer_keys=tuple(k for k, _ in top_first),
        defaults=defaults,
    )


def _layer_event(key: str, *, cached: bool, total: int, step: int | None = None) -> BuildEvent:
    return BuildEvent(
        kind=BuildEventKind.LAYER,
        message=("cached " if cached else "made ") + key,
        layer=key,
        cached=cached,
        step=step,
        total_steps=total,
    )


async def _run_step(
    runner: StepRunner,
    layers: LayerStore,
    key: str,
    step: str,
    index: int,
    total: int,
    *,
    stack: list[tuple[str, Path]],
    env: dict[str, str],
    workdir: str | None,
    user: str,
    emit: Emit,
) -> Path:
    tmp = await anyio.to_thread.run_sync(layers.new_tmp)
    tail: list[str] = []

    async def output(text: str) -> None:
        tail.append(text)
        del tail[:-20]
        await emit(BuildEvent(kind=BuildEventKind.LOG, data=text, step=index, total_steps=total))

    try:
        code = await runner.run_step(
            lowers=tuple(p for _, p in reversed(stack)),
            command=step,
            env=env,
            workdir=workdir,
            user=user,
            dest=tmp,
            output=output,
        )
        if code != 0:
            last = "".join(tail)[-2000:]
            raise InvalidRequest(
                f"build step {index} ({step[:80]!r}) failed with exit code {code}",
                details={"step": index, "exit_code": code, "output": last},
            )
        return await anyio.to_thread.run_sync(layers.commit, tmp, key)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise
