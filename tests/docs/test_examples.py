"""Every Python and shell example of the user-facing docs runs, as written, as its own process (issue 14, item 4).

Nothing ran the README's code as a user does, which is how a script that never exits (item 1) survived the
whole suite. Here each fenced ``python`` / ``bash`` / ``sh`` block of each doc in ``DOCS`` is written to a file
and run by a fresh interpreter or shell, twice: embedded (no ``CORRAL_URL``) and against the session's real
``corral serve`` (``CORRAL_URL``/``CORRAL_API_KEY``), with a timeout. It must exit 0 by itself. A block
followed by an ```` ```output ```` block must print those lines, in that order, among the rest.

The test never rewrites an example. What an example needs on the user's side it gets as a file in its working
directory (``local.csv``, ``alpine-rootfs.tar``: see ``_supply``). New sections are picked up by themselves;
a block opts out only with a visible marker on the line before its fence, giving the reason:

    <!-- docs-test: skip WHY -->              never run (say why, and what tests the same thing)
    <!-- docs-test: remote-only WHY -->       run against the server only
    <!-- docs-test: embedded-only WHY -->     run embedded only

Sandboxes an example leaves running (a script may end without ``kill()``: they live to their timeout, as
documented) are killed by the test afterwards, so the session's leak check stays meaningful.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.runsc, pytest.mark.busybox, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    "README.md",
    "deploy/README.md",
    "deploy/eks/README.md",
]  # user-facing docs (spec/ documents wire formats: no examples)
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
TIMEOUT = 240  # seconds per example, under the suite's 300 s per test; a hung one fails
_FENCE = re.compile(r"^```([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|remote-only|embedded-only)\b\s*(.*?)\s*-->\s*$")
_ANY_MARKER = re.compile(r"<!--\s*docs-test")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None = None  # skip / remote-only / embedded-only
    reason: str = ""
    output: tuple[str, ...] = ()  # lines of the ```output block that follows it

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.lang}"


def extract(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` in order, with their markers and expected output."""
    lines = (REPO / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(1):
            if _ANY_MARKER.search(lines[i]) and not _MARKER.match(lines[i]):
                raise AssertionError(f"{doc}:{i + 1}: malformed docs-test marker: {lines[i]!r}")
            i += 1
            continue
        lang, start = m.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        code = "\n".join(lines[i + 1 : end]) + "\n"
        prev = lines[start - 1] if start > 0 else ""
        mark = _MARKER.match(prev)
        if lang == "output":
            assert blocks, f"{doc}:{start + 1}: an output block must follow a code block"
            last = blocks.pop()
            blocks.append(Block(**{**last.__dict__, "output": tuple(code.splitlines())}))
        else:
            blocks.append(
                Block(
                    doc,
                    start + 1,
                    lang,
                    code,
                    marker=mark.group(1) if mark else None,
                    reason=mark.group(2) if mark else "",
                )
            )
        i = end + 1
    return blocks


def _examples() -> Iterator[object]:
    for doc in DOCS:
        for block in extract(doc):
            if block.lang not in RUNNABLE:
                continue
            for mode in ("embedded", "remote"):
                if (
                    block.marker == "skip"
                    or block.marker == f"{'remote' if mode == 'embedded' else 'embedded'}-only"
                ):
                    continue
                yield pytest.param(block, mode, id=f"{block.id}:{mode}")


def test_every_opt_out_says_why() -> None:
    blocks = [b for doc in DOCS for b in extract(doc)]
    assert [b for b in blocks if b.lang in RUNNABLE], "no runnable examples found: is the extraction broken?"
    for b in blocks:
        if b.marker:
            assert len(b.reason.split()) >= 3, (
                f"{b.id}: docs-test {b.marker} needs a reason a reader can check"
            )
        if b.output:
            assert b.lang in RUNNABLE, f"{b.id}: an output block follows a block that is not run"


def test_extraction_finds_markers_and_outputs(tmp_path: Path) -> None:
    """The extractor itself, on a doc made here (the README changes; these rules must not)."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n```python\nprint(1)\n```\n\n```output\n1\n```\n"
        "<!-- docs-test: skip because it waits for Ctrl-C -->\n```bash\nsleep infinity\n```\n"
        "```json\n{}\n```\n"
    )
    blocks = extract(str(doc))  # an absolute path: REPO / it is itself
    assert [(b.lang, b.marker, b.output) for b in blocks] == [
        ("python", None, ("1",)),
        ("bash", "skip", ()),
        ("json", None, ()),
    ]
    assert blocks[1].reason == "because it waits for Ctrl-C"


def _supply(workdir: Path) -> None:
    """The files on the user's side that examples name: a CSV, and a root file system tarball (busybox)."""
    (workdir / "local.csv").write_text("a,b\n1,2\n")
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is not installed; run scripts/install-host-deps"
    with tarfile.open(workdir / "alpine-rootfs.tar", "w") as tar:
        for d in ("bin", "proc", "dev", "tmp", "etc", "root"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "cat", "ls"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))


@contextlib.contextmanager
def _as_client(env: dict[str, str]) -> Iterator[None]:
    """This process's SDK pointed where the example's was (embedded, or the server)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("CORRAL_URL", "CORRAL_API_KEY"):
            if key in env:
                mp.setenv(key, env[key])
            else:
                mp.delenv(key, raising=False)
        yield


def _live(env: dict[str, str]) -> set[str]:
    with _as_client(env):
        return {info.sandbox_id for info in Sandbox.list()}


def _kill(env: dict[str, str], ids: set[str]) -> None:
    with _as_client(env):
        for sandbox_id in ids:
            Sandbox.connect(sandbox_id).kill()


@pytest.mark.parametrize(("block", "mode"), list(_examples()))
def test_example_runs_as_written(
    block: Block, mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_URL", "CORRAL_API_KEY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `corral`, `python3`
    if mode == "remote":
        server = request.getfixturevalue("corral_server")
        env.update(CORRAL_URL=server.url, CORRAL_API_KEY=server.api_key)
    _supply(tmp_path)
    script = tmp_path / ("example.py" if RUNNABLE[block.lang] == "python" else "example.sh")
    script.write_text(block.code)
    argv = [sys.executable, str(script)] if RUNNABLE[block.lang] == "python" else ["bash", "-e", str(script)]
    before = _live(env)
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id} ({mode}) did not exit within {TIMEOUT} s; output so far: {exc.stdout!r}")
    finally:
        _kill(env, _live(env) - before)
    assert done.returncode == 0, f"{block.id} ({mode}) exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    if block.output:
        printed = done.stdout.splitlines()
        position = 0
        for expected in block.output:
            assert expected in printed[position:], f"{block.id}: {expected!r} not printed in order: {printed}"
            position = printed.index(expected, position) + 1
