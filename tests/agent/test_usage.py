"""The ``usage`` op: CPU seconds, memory and disk as the sandbox sees them (corral.agent.usage)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import AgentProcess, Client


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_usage_without_cgroup_files_is_procs_and_meminfo(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent gets a pid namespace and /proc of its own, as in a sandbox")
    # in a pid namespace of its own with its own /proc, as in a sandbox: the CPU time is its processes' only
    proc = AgentProcess(tmp_path, prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    try:
        _check_procs_and_meminfo(proc.client())
    finally:
        proc.stop()


def _check_procs_and_meminfo(agent: Client) -> None:
    answer = agent.ok("usage")
    assert answer["mem_total"] == _meminfo("MemTotal")
    assert 0 < answer["mem_used"] < answer["mem_total"]
    disk = os.statvfs("/")
    assert answer["disk_total"] == disk.f_blocks * disk.f_frsize
    assert 0 < answer["disk_used"] <= answer["disk_total"]
    before = answer["cpu_seconds"]
    assert before > 0
    # a second of CPU time in a process the agent started, counted once it exited (its parent waited)
    spin = agent.run(["python3", "-c", "import time\nwhile time.process_time() < 1: pass"])
    assert spin.exit_code == 0
    assert agent.ok("usage")["cpu_seconds"] >= before + 0.95


@pytest.fixture
def cgroup_files(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Stand-ins for a memory cgroup's usage and stat files (the agent only reads them), opened read-only."""
    usage, stat = tmp_path / "memory.usage_in_bytes", tmp_path / "memory.stat"
    usage.write_text("300000000\n")
    stat.write_text("cache 1\ntotal_cache 120000000\ntotal_inactive_file 100000000\n")
    fds = (os.open(usage, os.O_RDONLY), os.open(stat, os.O_RDONLY))
    yield fds
    for fd in fds:
        os.close(fd)


def test_usage_from_the_memory_cgroup(tmp_path: Path, cgroup_files: tuple[int, int]) -> None:
    usage_fd, stat_fd = cgroup_files
    proc = AgentProcess(
        tmp_path, "--memory-usage-fd", str(usage_fd), "--memory-stat-fd", str(stat_fd), pass_fds=cgroup_files
    )
    client = proc.client()
    try:
        answer = client.ok("usage")
        # usage less inactive page cache; the total is the runtime's limit (the server knows it)
        assert answer["mem_used"] == 200_000_000 and answer["mem_cache"] == 120_000_000
        assert answer["mem_total"] is None
        (tmp_path / "memory.usage_in_bytes").write_text("400000000\n")  # read afresh each time
        assert client.ok("usage")["mem_used"] == 300_000_000
        # what the agent starts does not inherit the cgroup's files
        code = f"import os\ntry:\n    os.fstat({usage_fd}); print('open')\nexcept OSError: print('closed')"
        assert client.run(["python3", "-c", code]).stdout == b"closed\n"
    finally:
        assert proc.stop() in (0, -15)
