"""The code interpreter on both real runtimes, with real kernels (IPython, Node, bash) in real sandboxes.

The ``code-interpreter`` template is built once per session into the session's data dir (pip installs the
pinned wheels; pip's own cache makes repeat sessions fast). One sandbox per runtime serves the module.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import InvalidRequest, NotFound, Sandbox
from corral.client._sync.templates import Templates
from corral.models import CodeEventKind, OutputMessage

pytestmark = [pytest.mark.root, pytest.mark.slow]

RUNTIMES = [
    pytest.param("namespace", marks=pytest.mark.bwrap, id="namespace"),
    pytest.param("gvisor", marks=pytest.mark.runsc, id="gvisor"),
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a cell that says it started, then waits (bounded) for the test to create a file: output must stream
WAIT_FOR_GO = (
    "import os, time\n"
    "print('ready', flush=True)\n"
    "deadline = time.monotonic() + 60\n"
    "while not os.path.exists('{go}') and time.monotonic() < deadline:\n"
    "    time.sleep(0.02)\n"
    "print('go seen' if os.path.exists('{go}') else 'no go')\n"
)


@pytest.fixture(scope="session")
def code_template(corral_data_dir: Path) -> str:
    with Templates() as templates:
        return templates.build_code_interpreter().name


@pytest.fixture(scope="module", params=RUNTIMES)
def sbx(request: pytest.FixtureRequest, code_template: str) -> Iterator[Sandbox]:
    with Sandbox.create(template=code_template, isolation=request.param, timeout=900) as sandbox:
        yield sandbox


def test_state_is_kept_across_cells(sbx: Sandbox) -> None:
    first = sbx.run_code("x = 41")
    assert first.error is None and first.results == [] and first.text is None
    second = sbx.run_code("print('hello'); x + 1")
    assert second.text == "42"
    assert second.logs.stdout == ["hello\n"] and second.logs.stderr == []
    assert second.results[0].is_main_result
    assert second.execution_count is not None and second.execution_count > (first.execution_count or 0)


def test_rich_outputs_png_html_and_data(sbx: Sandbox) -> None:
    fig = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert fig.error is None, fig.error
    pngs = [r.png for r in fig.results if r.png]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(PNG_SIGNATURE)

    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    main = frame.results[0]
    assert main.is_main_result and main.html is not None and "<table" in main.html
    assert main.data == {"columns": ["a", "b"], "index": [0, 1], "data": [[1, "x"], [2, "y"]]}
    assert "html" in main.formats() and "data" in main.formats()


def test_display_and_magics(sbx: Sandbox) -> None:
    shown = sbx.run_code("from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n7")
    assert [(r.html, r.is_main_result) for r in shown.results] == [("<b>hi</b>", False), (None, True)]
    assert shown.text == "7"
    magic = sbx.run_code("%timeit -n 1 -r 1 sum(range(10))\n!echo from-shell")
    assert magic.error is None
    out = "".join(magic.logs.stdout)
    assert "per loop" in out and "from-shell" in out


def test_errors_carry_name_value_traceback(sbx: Sandbox) -> None:
    seen = []
    execution = sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=seen.append)
    assert execution.error is not None and seen == [execution.error]
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "f()" in execution.error.traceback
    assert sbx.run_code("undefined_name").error.name == "NameError"  # type: ignore[union-attr]


def test_output_streams_while_the_cell_runs(sbx: Sandbox) -> None:
    go = "/tmp/go-stream"
    kinds = []
    for event in sbx.stream_code(WAIT_FOR_GO.format(go=go)):
        kinds.append(event.kind)
        if event.kind is CodeEventKind.STDOUT and "ready" in event.text:
            sbx.files.write(go, b"")  # only possible because 'ready' arrived before the cell ended
        if event.kind is CodeEventKind.STDOUT and "go" in event.text:
            assert "go seen" in event.text
    assert kinds[-1] is CodeEventKind.END


def test_callbacks_get_output_messages(sbx: Sandbox) -> None:
    out: list[OutputMessage] = []
    err: list[OutputMessage] = []
    results = []
    sbx.run_code(
        "import sys\nprint('o')\nprint('e', file=sys.stderr)\n3",
        on_stdout=out.append,
        on_stderr=err.append,
        on_result=results.append,
    )
    assert [m.line for m in out] == ["o\n"] and [m.line for m in err] == ["e\n"] and err[0].error
    assert [r.text for r in results] == ["3"]


def test_timeout_interrupts_and_keeps_the_context(sbx: Sandbox) -> None:
    sbx.run_code("kept = 'yes'")
    execution = sbx.run_code("import time\nwhile True:\n    time.sleep(0.1)", timeout=1)
    assert execution.timed_out and execution.error is not None and execution.error.name == "TimeoutError"
    assert sbx.run_code("kept").text == "'yes'"


def test_interrupt_keeps_the_context(sbx: Sandbox) -> None:
    ctx = sbx.create_code_context(language="python")
    sbx.run_code("y = 5", context=ctx)
    errors = []
    for event in sbx.stream_code(
        "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.1)", context=ctx
    ):
        if event.kind is CodeEventKind.STDOUT and "ready" in event.text:
            sbx.interrupt_code_context(ctx)
        if event.kind is CodeEventKind.ERROR:
            errors.append(event.error)
    assert [e.name for e in errors if e] == ["KeyboardInterrupt"]
    assert sbx.run_code("y * 2", context=ctx).text == "10"
    sbx.remove_code_context(ctx)


def test_javascript_context_is_stateful(sbx: Sandbox) -> None:
    assert sbx.run_code("let n = 41; console.log('from node')", language="javascript").logs.stdout == [
        "from node\n"
    ]
    assert sbx.run_code("n + 1", language="js").text == "42"
    failed = sbx.run_code("null.boom", language="js")
    assert failed.error is not None and failed.error.name == "TypeError"
    slow = sbx.run_code("while (true) {}", language="js", timeout=1)
    assert slow.timed_out and slow.error is not None and slow.error.name == "TimeoutError"
    assert sbx.run_code("n", language="js").text == "41"  # survived the interrupt
    assert sbx.run_code("await Promise.resolve(1)", language="js").error is not None  # no top-level await


def test_bash_context_is_stateful(sbx: Sandbox) -> None:
    first = sbx.run_code("export GREETING=hi; cd /tmp; echo out; echo err >&2", language="bash")
    assert first.logs.stdout == ["out\n"] and first.logs.stderr == ["err\n"] and first.error is None
    second = sbx.run_code('echo "$GREETING $(pwd)"', language="bash")
    assert second.logs.stdout == ["hi /tmp\n"]
    failed = sbx.run_code("false", language="bash")
    assert failed.error is not None and failed.error.value == "exit status 1"
    slow = sbx.run_code("sleep 60; echo not-reached", language="bash", timeout=1)
    assert slow.timed_out and "not-reached" not in "".join(slow.logs.stdout)
    assert sbx.run_code('echo "$GREETING"', language="bash").logs.stdout == ["hi\n"]


def test_contexts_are_separate_and_restart_clears_state(sbx: Sandbox) -> None:
    ctx = sbx.create_code_context(language="python", cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp" and ctx in sbx.list_code_contexts()
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    sbx.run_code("only_here = 1", context=ctx)
    assert sbx.run_code("only_here").error is not None  # the default context is another kernel
    sbx.restart_code_context(ctx)
    gone = sbx.run_code("only_here", context=ctx)
    assert gone.error is not None and gone.error.name == "NameError"
    sbx.remove_code_context(ctx)


@pytest.mark.parametrize(
    ("language", "pid_code"), [("python", "import os; os.getpid()"), ("js", "process.pid")]
)
def test_removing_a_context_leaves_no_process(sbx: Sandbox, language: str, pid_code: str) -> None:
    ctx = sbx.create_code_context(language=language)
    pid = sbx.run_code(pid_code, context=ctx).text
    assert pid is not None and pid.isdigit()
    assert sbx.commands.run(f"test -d /proc/{pid}").exit_code == 0
    sbx.remove_code_context(ctx)
    assert ctx not in sbx.list_code_contexts()
    assert sbx.commands.run(f"test -d /proc/{pid}").exit_code == 1
    with pytest.raises(NotFound):
        sbx.run_code("1", context=ctx)


def test_bad_requests_are_typed_errors(sbx: Sandbox) -> None:
    with pytest.raises(InvalidRequest, match="unknown language"):
        sbx.run_code("1", language="cobol")
    with pytest.raises(NotFound):
        sbx.restart_code_context("ctx-0000000000000000")
    with pytest.raises(NotFound):
        sbx.create_code_context(language="python", cwd="/no/such/dir")


def test_contexts_outlive_the_client(sbx: Sandbox) -> None:
    sbx.run_code("shared = 'across clients'")
    other = Sandbox.connect(sbx.sandbox_id)  # a second client with its own backend (not a with-block:
    try:  # that would kill the sandbox when it ends)
        assert other.run_code("shared").text == "'across clients'"
    finally:
        other.close()


@pytest.fixture(params=RUNTIMES)
def own_sbx(request: pytest.FixtureRequest, code_template: str) -> Iterator[Sandbox]:
    """A sandbox of the test's own: what hostile code does to its interpreter must not reach other tests."""
    with Sandbox.create(template=code_template, isolation=request.param, timeout=300) as sandbox:
        yield sandbox


def test_garbage_on_the_driver_channel_is_ignored(own_sbx: Sandbox) -> None:
    """Code in the sandbox may reach the driver's answer pipe (same uid); the host must shrug it off.

    (On namespace sandboxes opening another process's fd through /proc is refused; where it is allowed the
    garbage reaches the host's line parser, which must ignore it and keep answering.)
    """
    forged = r"""
import os
drv = os.getppid()
written = 0
for fd in os.listdir(f'/proc/{drv}/fd'):
    if fd != '0' and os.readlink(f'/proc/{drv}/fd/{fd}').startswith('pipe:'):
        try:  # non-blocking: a pipe nobody drains (the kernel's own stdin) must not hang this cell
            w = os.open(f'/proc/{drv}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK)
        except PermissionError:
            continue
        try:
            os.write(w, b'not json\n{"id": "x", "ev": "end"}\n[1,2]\n' + b'A' * (1 << 16) + b'\n')
            written += 1
        except (BlockingIOError, BrokenPipeError):
            pass
        finally:
            os.close(w)
written
"""
    execution = own_sbx.run_code(forged, timeout=60)
    assert execution.error is None and execution.text is not None and execution.text.isdigit()
    assert own_sbx.run_code("6 * 7").text == "42"


def test_cli_run_code_saves_figures(sbx: Sandbox, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from corral.cli.main import cli

    runner = CliRunner()
    code = "import matplotlib.pyplot as plt\nplt.plot([2, 1])\nplt.show()\nprint('drawn')"
    done = runner.invoke(cli, ["run-code", "--sandbox", sbx.sandbox_id, "--save-dir", str(tmp_path), code])
    assert done.exit_code == 0, done.output
    assert "drawn" in done.output and "png saved to" in done.output
    assert (tmp_path / "result-0.png").read_bytes().startswith(PNG_SIGNATURE)
    failed = runner.invoke(
        cli,
        ["run-code", "--sandbox", sbx.sandbox_id, "-l", "bash", "exit_code_is() { return 3; }; exit_code_is"],
    )
    assert failed.exit_code == 1
