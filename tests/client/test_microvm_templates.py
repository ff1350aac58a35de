"""A microVM snapshot becomes a template (issue 10): its disk image and memory, restored by microvm alone.

One VM is booted and one restored from its snapshot (two at a time, the CI budget).
"""

from __future__ import annotations

import pytest

from corral import Sandbox
from corral.client._sync.templates import Templates
from corral.core.settings import Settings
from corral.errors import Unsupported

pytestmark = [pytest.mark.root, pytest.mark.qemu]


def test_a_microvm_snapshot_is_a_template_with_its_files_and_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CORRAL_URL", raising=False)
    name = "mv-snapshot"
    with Sandbox.create(isolation="microvm", timeout=900) as sbx:
        sbx.files.write("/home/user/state.txt", b"taken before the snapshot")
        counter = sbx.commands.start(
            # written aside and renamed: a read (or the snapshot) between truncate and write saw b""
            'python3 -c \'import os, time\nn = 0\nwhile True:\n    n += 1; open("/tmp/n.new", "w").write(str(n)); '
            'os.replace("/tmp/n.new", "/tmp/n"); time.sleep(0.2)\''
        )
        sbx.commands.run("while [ ! -s /tmp/n ]; do sleep 0.1; done", timeout=120)  # it counts
        info = sbx.snapshot(name)
        assert info.memory, info
        try:
            sbx.files.write("/home/user/state.txt", b"written after it")  # the template keeps its own copy
            with Sandbox.create(template=name, isolation="microvm", timeout=900) as child:
                assert child.files.read("/home/user/state.txt") == b"taken before the snapshot"
                running = {p.process_id for p in child.commands.list()}
                assert counter.process_id in running  # restored with its memory: the process lives on
                first = int(child.files.read("/tmp/n"))
                assert int(child.commands.run("sleep 1; cat /tmp/n").stdout) > first
            with pytest.raises(Unsupported, match="microvm snapshot"):
                Sandbox.create(template=name, isolation="namespace", timeout=60)
        finally:
            with Templates() as templates:
                templates.delete(name)
    left = [p.name for p in (Settings.load().cache_root / "snapshots").glob(f"{name}-*")]
    assert not left, left  # the template's disk and memory images went with it
