"""Templates from OCI images: real registry on 127.0.0.1, real skopeo, real sandboxes (namespace and gVisor)."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import pytest

from corral.client._local import open_service
from corral.core.records import LOCAL_TENANT
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest, NotFound, PermissionDenied
from corral.images._extract import OPAQUE_XATTR, Whiteouts
from corral.images.layers import LayerStore
from corral.images.registry import ImageRef
from corral.models import BuildEvent, BuildEventKind, BuildParams, CreateParams, ExecParams

from .conftest import Registry, _build_busybox, member, tar_bytes, write_layout

pytestmark = [pytest.mark.root, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def service() -> AsyncIterator[SandboxService]:
    async with open_service(Settings.load()) as svc:
        yield svc
        await svc.store.aclose()


async def build(service: SandboxService, params: BuildParams) -> list[BuildEvent]:
    events = [e async for e in await service.build_template(params)]
    assert events[-1].kind is BuildEventKind.DONE
    return events


async def run(service: SandboxService, sandbox_id: str, cmd: str, **kw: object) -> tuple[int | None, str]:
    out, code = b"", None
    async for ev in await service.exec(sandbox_id, ExecParams(cmd=cmd, **kw), tenant=LOCAL_TENANT):  # type: ignore[arg-type]
        if ev.kind.value in ("stdout", "stderr"):
            out += ev.data
        elif ev.kind.value == "exit":
            code = ev.exit_code
    return code, out.decode()


def layer_events(events: list[BuildEvent]) -> list[BuildEvent]:
    return [e for e in events if e.kind is BuildEventKind.LAYER]


@pytest.mark.parametrize(
    "isolation",
    [pytest.param("namespace", marks=pytest.mark.bwrap), pytest.param("gvisor", marks=pytest.mark.runsc)],
)
async def test_image_with_a_step_runs_in_a_sandbox(
    service: SandboxService, busybox_image: str, isolation: str
) -> None:
    name = f"bb-step-{isolation}"
    events = await build(
        service,
        BuildParams(
            name=name,
            source=busybox_image,
            # the step names the runtime: step layers are cached by content, so each runtime really runs one
            steps=[f"echo built > /opt/built && rm /opt/old/new && echo step-output {isolation}"],
            env={"EXTRA": "1"},
            isolation=isolation,
        ),
    )
    assert any(e.kind is BuildEventKind.LOG and f"step-output {isolation}" in e.data for e in events)
    assert [e.step for e in layer_events(events)] == [None, None, 1]  # two image layers, one step layer
    info = await service.create(CreateParams(template=name, isolation=isolation), tenant=LOCAL_TENANT)
    try:
        sid = info.sandbox_id
        assert await run(service, sid, "cat /opt/built") == (0, "built\n")  # the step's layer
        assert (await run(service, sid, "cat /etc/gone"))[0] != 0  # whiteout in layer 2
        assert (await run(service, sid, "ls /opt/old"))[
            1
        ].split() == []  # replaced in layer 2, removed by the step
        code, out = await run(service, sid, "stat -c %i /bin/data /bin/data-link")
        inodes = out.split()
        assert code == 0 and len(inodes) == 2 and inodes[0] == inodes[1]  # the hard link survived
        assert await run(service, sid, "echo $GREETING-$EXTRA") == (
            0,
            "hello from the image-1\n",
        )  # image env
        assert await run(service, sid, "pwd") == (0, "/opt\n")  # image workdir
        assert await run(service, sid, "id -u") == (0, "0\n")  # image user: none named → root, as in docker
        assert await run(service, sid, "touch /etc/new && cat /etc/passwd | head -c 4") == (0, "root")
    finally:
        await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    await service.templates.delete(name)


@pytest.mark.bwrap
async def test_rebuild_reuses_every_layer(
    service: SandboxService, registry: Registry, tmp_path: Path
) -> None:
    image = _build_busybox(registry, tmp_path, "test/rebuild:1")
    params = BuildParams(name="rb-1", source=image, steps=["echo one > /one"], isolation="namespace")
    first = await build(service, params)
    assert registry.blob_gets("test/rebuild") == 3  # config + two layers
    layer_digests = {e.layer.replace("-", ":", 1) for e in layer_events(first) if e.layer and e.step is None}
    assert len(layer_digests) == 2 and registry.blob_gets("test/rebuild", layer_digests) == 2
    assert [e.cached for e in layer_events(first)] == [False, False, False]
    again = await build(service, BuildParams(**{**params.to_wire(), "name": "rb-2"}))
    assert [e.cached for e in layer_events(again)] == [True, True, True]  # nothing unpacked, no step run
    assert not any(e.kind is BuildEventKind.LOG for e in again)
    assert registry.blob_gets("test/rebuild", layer_digests) == 2  # no layer downloaded again (config may be)
    changed = await build(
        service, BuildParams(**{**params.to_wire(), "name": "rb-3", "steps": ["echo two > /two"]})
    )
    assert [e.cached for e in layer_events(changed)] == [True, True, False]  # a new step is a new layer
    for name in ("rb-1", "rb-2", "rb-3"):
        await service.templates.delete(name)


async def test_registry_credentials(service: SandboxService, auth_registry: Registry, tmp_path: Path) -> None:
    image = _build_busybox(auth_registry, tmp_path, "private/bb:1")
    with pytest.raises(PermissionDenied, match="credentials"):
        await build(service, BuildParams(name="priv", source=image))
    with pytest.raises(PermissionDenied):
        await build(
            service, BuildParams(name="priv", source=image, registry_username="alice", registry_password="no")
        )
    await build(
        service, BuildParams(name="priv", source=image, registry_username="alice", registry_password="s3cret")
    )
    assert (await service.templates.get("priv")) is not None
    await service.templates.delete("priv")


async def test_bad_sources_are_typed_errors(service: SandboxService, registry: Registry) -> None:
    with pytest.raises(NotFound, match="not found"):
        await build(service, BuildParams(name="x", source=f"{registry.host}/no/such:1"))
    with pytest.raises(NotFound):
        await build(service, BuildParams(name="x", source=f"{registry.host}/test/busybox:nosuchtag"))
    with pytest.raises(InvalidRequest, match="cannot reach"):
        await build(service, BuildParams(name="x", source="127.0.0.1:1/any/image:1"))
    with pytest.raises(InvalidRequest, match="plain http"):
        await build(service, BuildParams(name="x", source="http://registry.example.com/a:1"))
    with pytest.raises(InvalidRequest, match="not an image reference"):
        await build(service, BuildParams(name="x", source="UPPER/Case::"))
    assert await service.templates.get("x") is None
    assert ImageRef.parse("busybox").repo == "library/busybox"


@pytest.mark.parametrize(
    "bad",
    [
        member("../escape"),
        member("lnk", tarfile.SYMTYPE, linkname="/../../../../etc"),
        member("hard", tarfile.LNKTYPE, linkname="../../outside"),
        member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("bad/.wh..."),
    ],
    ids=["dotdot", "abs-symlink-out", "hardlink-out", "device", "whiteout-dotdot"],
)
async def test_malicious_layers_are_refused_and_leave_nothing(
    service: SandboxService, registry: Registry, tmp_path: Path, bad: tarfile.TarInfo
) -> None:
    good = tar_bytes([(member("ok.txt"), b"fine")])
    evil = tar_bytes([(member("a.txt"), b"first"), (bad, b"x" if bad.isreg() else b"")])
    image = registry.push(
        write_layout(tmp_path / "layout", [good, evil]), "t", f"evil/{bad.name[:3].strip('./') or 'x'}:1"
    )
    store = service.templates.layers
    before = set(os.listdir(store.root)) if store.root.exists() else set()
    with pytest.raises(InvalidRequest, match=r"layer 2 of .* cannot be unpacked safely"):
        await build(service, BuildParams(name="evil", source=image))
    after = set(os.listdir(store.root))
    new = after - before
    assert all(not n.startswith(".") for n in after)  # no half-written temporary layer
    assert len(new) <= 1  # at most the good first layer, complete
    escaped = [tmp_path.parent / "escape", Path("/escape")]
    assert not any(await anyio.to_thread.run_sync(lambda: [p.exists() for p in escaped]))
    assert await service.templates.get("evil") is None


def test_oci_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "layers")
    blob = tmp_path / "layer.tar"
    blob.write_bytes(
        tar_bytes(
            [
                (member("etc", tarfile.DIRTYPE), b""),
                (member("etc/.wh.gone"), b""),
                (member("opt", tarfile.DIRTYPE), b""),
                (member("opt/.wh..wh..opq"), b""),
                (member("opt/kept"), b"k"),
                (member("bin", tarfile.DIRTYPE), b""),
                (member("bin/a"), b"same"),
                (member("bin/b", tarfile.LNKTYPE, linkname="bin/a"), b""),
            ]
        )
    )
    made = store.unpack("sha256-" + "a" * 64, blob, compression="tar", what="layer 1")
    gone = os.lstat(made.path / "etc" / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert os.getxattr(made.path / "opt", OPAQUE_XATTR) == b"y"
    assert (
        not (made.path / "opt" / ".wh..wh..opq").exists() and (made.path / "opt" / "kept").read_text() == "k"
    )
    assert os.stat(made.path / "bin" / "a").st_ino == os.stat(made.path / "bin" / "b").st_ino
    assert store.unpack("sha256-" + "a" * 64, blob, compression="tar", what="layer 1").created is False
    assert Whiteouts.OVERLAY.value == "overlay"


@pytest.mark.bwrap
async def test_start_and_ready_commands(service: SandboxService, busybox_image: str) -> None:
    await build(
        service,
        BuildParams(
            name="bb-svc",
            source=busybox_image,
            start_cmd="echo up > /tmp/started; exec sleep 600",
            ready_cmd="test -f /tmp/started",
        ),
    )
    info = await service.create(CreateParams(template="bb-svc", isolation="namespace"), tenant=LOCAL_TENANT)
    try:
        assert await run(service, info.sandbox_id, "cat /tmp/started") == (
            0,
            "up\n",
        )  # ready before create returned
        code, out = await run(service, info.sandbox_id, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert code == 0 and "sleep 600" in out  # start_cmd is still running in the background
    finally:
        await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    await service.templates.delete("bb-svc")


@pytest.mark.slow  # ~85 s on this machine (debootstrap --variant=minbase bookworm from the apt mirror)
@pytest.mark.bwrap
async def test_debootstrap_template(service: SandboxService) -> None:
    events = await build(
        service,
        BuildParams(
            name="deb", source="debootstrap:bookworm", steps=["echo hi > /hello"], isolation="namespace"
        ),
    )
    assert [e.cached for e in layer_events(events)] == [False, False]
    info = await service.create(CreateParams(template="deb", isolation="namespace"), tenant=LOCAL_TENANT)
    try:
        assert await run(service, info.sandbox_id, "cat /hello /etc/debian_version | head -1") == (0, "hi\n")
        assert (await run(service, info.sandbox_id, "dpkg -s coreutils | grep -c installed"))[
            1
        ].strip() == "1"
    finally:
        await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    again = await build(
        service, BuildParams(name="deb2", source="debootstrap:bookworm", steps=["echo hi > /hello"])
    )
    assert [e.cached for e in layer_events(again)] == [True, True]
    for name in ("deb", "deb2"):
        await service.templates.delete(name)
