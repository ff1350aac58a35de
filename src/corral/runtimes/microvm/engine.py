"""The engine interface: what the microvm runtime needs from a VMM, and nothing more.

Everything else (guest, disks, the shim, snapshots as files, teardown by the VM's processes) is engine-
independent and lives in :mod:`.runtime`. An engine turns a :class:`~.vm.VmConfig` into the command the shim
runs, whose stdin/stdout must be the agent's byte stream (QEMU: a virtio-serial port on its ``stdio``
chardev), and drives that running VMM through its control socket in the state dir. Every method but
:meth:`Engine.launch` and :meth:`Engine.checkpoint_argv` blocks and runs in a worker thread.

``qemu`` (:mod:`.qemu`) is the one that runs sandboxes. ``firecracker`` and ``cloud-hypervisor``
(:mod:`.firecracker`) have their API calls (``PATCH /vm`` / ``vm.pause``, snapshot create/load, the machine
config), REST client and vsock handshake (:mod:`.rest`), but not yet the relay that would stand in the
command's place (start the VMM, configure it, splice the authenticated vsock stream to stdio), so selecting
them is a typed refusal at ``check_host``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from corral.runtimes._shimspec import FdFile
from corral.runtimes.microvm.vm import VmConfig

__all__ = ["Engine", "Launch"]


@dataclass(frozen=True)
class Launch:
    """How the shim starts a VMM: its command, and host files it opens for it as descriptors (a memory image
    to restore: the VMM runs as an unprivileged uid that cannot open the root-only state dir itself)."""

    argv: list[str]
    files: list[FdFile] = field(default_factory=list)


class Engine(Protocol):
    name: str

    def check(self) -> str:
        """The VMM binary, or RuntimeUnavailable naming the package (never probes /dev/kvm on its own)."""

    def launch(
        self, binary: str, config: VmConfig, state_dir: Path, *, uid: int, incoming: Path | None = None
    ) -> Launch:
        """Boot ``config`` (or restore the memory image ``incoming``) as host ``uid``; stdio = the agent's
        channel."""

    def checkpoint_argv(self, python: str, state_dir: Path, image: Path) -> list[str]:
        """A command that saves the VM's memory to ``image`` and ends the VMM (a pause to disk)."""

    def pause(self, state_dir: Path) -> None: ...

    def resume(self, state_dir: Path) -> None: ...

    def save_memory(self, state_dir: Path, image: Path, *, then_quit: bool) -> None:
        """Stop the VM and write its memory and device state to ``image`` (a snapshot)."""

    def status(self, state_dir: Path) -> str | None:
        """The VMM's run state ("running", "paused", …), None if it does not answer."""

    def quiet_console(self, state_dir: Path) -> None:
        """Stop writing the guest console to the host's disk (the guest now runs untrusted code)."""
