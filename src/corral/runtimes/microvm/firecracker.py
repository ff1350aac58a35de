"""The ``firecracker`` and ``cloud-hypervisor`` engines: the same microVM over a REST API and vsock.

What each sends is data (:class:`~.rest.Call` lists built from the engine-independent
:class:`~.vm.VmConfig`), checked by tests against the documented API shapes; :class:`~.rest.RestApi` sends
it. Disks are raw (``Disk.format == "raw"``: the runtime gives these engines :func:`~.disks.raw_upper`),
there is no NIC, and the agent listens on vsock (``--listen vsock:PORT --secret-file``, mutual HMAC: a vsock
is not a private channel) reached through the VMM's vsock Unix socket (:func:`~.rest.vsock_connect`).
Firecracker runs through its **jailer** (chroot, its own uid/gid from the allocator, new pid namespace,
cgroups); cloud-hypervisor under its own seccomp filter.

Not here yet (say so rather than pretend): the relay that sits in the shim's command slot (start the VMM,
send :meth:`machine`, then splice the authenticated vsock stream to its stdio), so :meth:`check` refuses
with a typed error after finding the binaries. Neither VMM can run on this host (no registry ships them;
no usable /dev/kvm), so nothing could test such a relay here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from corral.errors import InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.runtimes.microvm.rest import Call, RestApi
from corral.runtimes.microvm.vm import VmConfig, kernel_cmdline

__all__ = ["AGENT_VSOCK_PORT", "GUEST_CID", "CloudHypervisorEngine", "FirecrackerEngine"]

GUEST_CID = 3  # the first guest context id (0-2 are reserved)
AGENT_VSOCK_PORT = 1024  # the agent's --listen vsock:PORT
SNAPSHOT_TIMEOUT = 300.0
_RELAY = 'its agent relay (vsock to the shim) is not built yet; use [runtime.microvm] engine = "qemu"'


def _require(binary: str, what: str) -> str:
    found = shutil.which(binary)
    if found is None:
        install = f"put the {what} release binary `{binary}` on PATH (not packaged for Debian or PyPI)"
        raise RuntimeUnavailable(
            f"{what} ({binary}) is not installed on this host; {install}",
            details={"binary": binary, "install": install},
        )
    return found


class FirecrackerEngine:
    """Firecracker through its jailer; API and vsock sockets inside the jail's chroot."""

    name = "firecracker"

    def __init__(self, *, binary: str | None = None, jailer: str | None = None) -> None:
        self.binary_name = binary or "firecracker"
        self.jailer_name = jailer or "jailer"

    def check(self) -> str:
        _require(self.binary_name, "Firecracker")  # what to install comes first, then what is missing here
        _require(self.jailer_name, "Firecracker's jailer")
        raise RuntimeUnavailable(f"the firecracker engine is not usable: {_RELAY}")

    @staticmethod
    def jail_root(state_dir: Path, jail_id: str) -> Path:
        """The chroot the jailer makes below ``--chroot-base-dir`` (``<base>/firecracker/<id>/root``)."""
        return state_dir / "jail" / "firecracker" / jail_id / "root"

    def jailer_argv(
        self, firecracker: str, jailer: str, state_dir: Path, jail_id: str, uid: int
    ) -> list[str]:
        if not jail_id.replace("-", "").isalnum() or len(jail_id) > 64:
            raise InvalidRequest("a jail id is letters, digits and dashes (at most 64)")
        return [
            jailer,
            "--id",
            jail_id,
            "--exec-file",
            firecracker,
            "--uid",
            str(uid),
            "--gid",
            str(uid),
            "--chroot-base-dir",
            str(state_dir / "jail"),
            "--new-pid-ns",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ]

    def machine(self, config: VmConfig) -> list[Call]:
        """The calls that configure and start ``config``; every path as the jailed VMM sees it (the files are
        linked into the chroot under their base names)."""
        calls = [
            Call(
                "PUT",
                "/boot-source",
                {
                    "kernel_image_path": "/" + Path(config.kernel).name,
                    "initrd_path": "/" + Path(config.initramfs).name,
                    "boot_args": kernel_cmdline(config),
                },
            ),
            Call(
                "PUT",
                "/machine-config",
                {"vcpu_count": config.vcpus, "mem_size_mib": config.memory_mb, "smt": False},
            ),
        ]
        for disk in config.disks:
            if disk.format != "raw":
                raise InvalidRequest("Firecracker takes raw disks only")
            # Firecracker: [A-Za-z0-9_], and the guest reads the drive id as the serial: its /init looks
            # a disk up by either spelling (see guest.INIT), so both engines find disks the same way
            drive_id = disk.serial.replace("-", "_")
            calls.append(
                Call(
                    "PUT",
                    f"/drives/{drive_id}",
                    {
                        "drive_id": drive_id,
                        "path_on_host": "/" + Path(disk.path).name,
                        "is_root_device": False,
                        "is_read_only": disk.readonly,
                    },
                )
            )
        calls.append(Call("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": "/run/vsock.sock"}))
        calls.append(Call("PUT", "/actions", {"action_type": "InstanceStart"}))
        return calls

    def _api(self, state_dir: Path, jail_id: str) -> RestApi:
        return RestApi(self.jail_root(state_dir, jail_id) / "run" / "firecracker.socket")

    def pause(self, state_dir: Path, jail_id: str) -> None:
        self._api(state_dir, jail_id).send(Call("PATCH", "/vm", {"state": "Paused"}))

    def resume(self, state_dir: Path, jail_id: str) -> None:
        self._api(state_dir, jail_id).send(Call("PATCH", "/vm", {"state": "Resumed"}))

    @staticmethod
    def snapshot_call(snapshot: str, memory: str) -> Call:
        return Call(
            "PUT",
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": snapshot, "mem_file_path": memory},
        )

    @staticmethod
    def load_call(snapshot: str, memory: str) -> Call:
        return Call(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": snapshot,
                "mem_backend": {"backend_type": "File", "backend_path": memory},
                "resume_vm": True,
            },
        )

    def status(self, state_dir: Path, jail_id: str) -> str | None:
        """ "running", "paused" or "not started" (Firecracker's instance info), None if it does not answer."""
        try:
            info = self._api(state_dir, jail_id).send(Call("GET", "/"))
        except (RuntimeFailure, ValueError):  # no answer, or not JSON
            return None
        state = info.get("state") if isinstance(info, dict) else None
        return state.lower() if isinstance(state, str) else None


class CloudHypervisorEngine:
    """cloud-hypervisor with its API socket in the state dir (``/api/v1/...``)."""

    name = "cloud-hypervisor"

    def __init__(self, *, binary: str | None = None) -> None:
        self.binary_name = binary or "cloud-hypervisor"

    def check(self) -> str:
        _require(self.binary_name, "Cloud Hypervisor")
        raise RuntimeUnavailable(f"the cloud-hypervisor engine is not usable: {_RELAY}")

    @staticmethod
    def argv(binary: str, state_dir: Path) -> list[str]:
        return [binary, "--api-socket", f"path={state_dir / 'ch.sock'}", "--seccomp", "true"]

    def machine(self, config: VmConfig, state_dir: Path) -> list[Call]:
        for disk in config.disks:
            if disk.format != "raw":
                raise InvalidRequest("the cloud-hypervisor engine takes raw disks only")
        body = {
            "cpus": {"boot_vcpus": config.vcpus, "max_vcpus": config.vcpus},
            "memory": {"size": config.memory_mb * 1024 * 1024},
            "payload": {
                "kernel": config.kernel,
                "initramfs": config.initramfs,
                "cmdline": kernel_cmdline(config),
            },
            "disks": [
                {"path": d.path, "readonly": d.readonly, "serial": d.serial, "id": d.serial}
                for d in config.disks
            ],
            "vsock": {"cid": GUEST_CID, "socket": str(state_dir / "vsock.sock")},
            "serial": {"mode": "File", "file": str(state_dir / "console.log")},
            "console": {"mode": "Off"},
        }  # no "net": no NIC
        return [Call("PUT", "/api/v1/vm.create", body), Call("PUT", "/api/v1/vm.boot")]

    def _api(self, state_dir: Path) -> RestApi:
        return RestApi(state_dir / "ch.sock")

    def pause(self, state_dir: Path) -> None:
        self._api(state_dir).send(Call("PUT", "/api/v1/vm.pause"))

    def resume(self, state_dir: Path) -> None:
        self._api(state_dir).send(Call("PUT", "/api/v1/vm.resume"))

    @staticmethod
    def snapshot_call(directory: Path) -> Call:
        return Call("PUT", "/api/v1/vm.snapshot", {"destination_url": directory.as_uri()})

    @staticmethod
    def restore_call(directory: Path) -> Call:
        return Call("PUT", "/api/v1/vm.restore", {"source_url": directory.as_uri()})

    def status(self, state_dir: Path) -> str | None:
        """ "running", "paused", "created" or "shutdown" (its vm.info), None if it does not answer."""
        try:
            info = self._api(state_dir).send(Call("GET", "/api/v1/vm.info"))
        except (RuntimeFailure, ValueError):  # no answer, or not JSON
            return None
        state = info.get("state") if isinstance(info, dict) else None
        return state.lower() if isinstance(state, str) else None
