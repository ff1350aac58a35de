"""The real ``e2b-code-interpreter`` SDK against Corral's interpreter, through port 49999's ``/execute`` and
``/contexts`` (sandboxes from ``Sandbox.create()``, E2B's default ``code-interpreter-v1`` template)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from _e2b_server import E2BServer
from e2b_code_interpreter import Sandbox

pytestmark = [pytest.mark.slow]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ci(module_env: E2BServer) -> Iterator[Sandbox]:
    # the first create builds the template (pip installs its kernels' packages): give that its time
    sandbox = Sandbox.create(timeout=900, request_timeout=1500)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_state_lives_across_cells_and_output_streams(ci: Sandbox) -> None:
    assert ci.run_code("x = 41").error is None
    seen: list[str] = []
    execution = ci.run_code(
        "import sys\nprint('hello')\nprint('warn', file=sys.stderr)\nx + 1",
        on_stdout=lambda m: seen.append(m.line),
    )
    assert execution.text == "42"
    assert execution.logs.stdout == ["hello\n"] and execution.logs.stderr == ["warn\n"]
    assert seen == ["hello\n"]
    assert execution.results[0].is_main_result
    assert execution.execution_count is not None and execution.execution_count >= 2


def test_errors_carry_name_value_and_traceback(ci: Sandbox) -> None:
    execution = ci.run_code("def f():\n    return undefined_name\nf()")
    assert execution.error is not None
    assert execution.error.name == "NameError"
    assert "undefined_name" in execution.error.value
    assert "f()" in execution.error.traceback and "NameError" in execution.error.traceback


def test_rich_results_png_html_and_data(ci: Sandbox) -> None:
    fig = ci.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()")
    pngs = [r.png for r in fig.results if r.png]
    assert pngs and base64.b64decode(pngs[0]).startswith(PNG)
    table = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    main = table.results[0]
    assert main.html is not None and "<table" in main.html
    assert main.text is not None and "a" in main.text


def test_contexts_create_list_restart_remove(ci: Sandbox) -> None:
    ctx = ci.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    assert ci.run_code("y = 5", context=ctx).error is None
    assert ctx.id in [c.id for c in ci.list_code_contexts()]
    assert ci.run_code("y", context=ctx).text == "5"
    ci.restart_code_context(ctx)
    after = ci.run_code("y", context=ctx)
    assert after.error is not None and after.error.name == "NameError"  # a restart forgets the state
    ci.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]
    from e2b import NotFoundException

    with pytest.raises(NotFoundException):
        ci.run_code("1", context=ctx)


def test_languages(ci: Sandbox) -> None:
    assert ci.run_code("1 + 2", language="python").text == "3"
    js = ci.run_code("const a = 20; a * 2 + 2", language="js")
    assert js.text == "42", js
    sh = ci.run_code("echo from-bash", language="bash")
    assert sh.logs.stdout == ["from-bash\n"], sh


def test_per_cell_env_vars(ci: Sandbox) -> None:
    value = 'it\'s "quoted" $HOME'
    execution = ci.run_code("import os; os.environ.get('CELL_VAR')", envs={"CELL_VAR": value})
    assert execution.text == repr(value), execution
    assert ci.run_code("import os; 'CELL_VAR' in os.environ").text == "False"  # for that cell only
    js = ci.run_code("process.env.CELL_VAR", language="js", envs={"CELL_VAR": value})
    assert js.text is not None and value in js.text, js
    assert ci.run_code("'CELL_VAR' in process.env", language="js").text == "false"
    sh = ci.run_code(
        'echo "$CELL_VAR"; sh -c \'echo "child:$CELL_VAR"\'', language="bash", envs={"CELL_VAR": value}
    )
    assert "".join(sh.logs.stdout) == f"{value}\nchild:{value}\n", sh
    assert ci.run_code('echo "[$CELL_VAR]"', language="bash").logs.stdout == ["[]\n"]


def test_matplotlib_figures_come_with_their_chart_data(ci: Sandbox) -> None:
    from e2b_code_interpreter.charts import ChartType

    execution = ci.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [4, 5, 6], label='growth')\n"
        "plt.title('Growth')\nplt.xlabel('day')\nplt.ylabel('n')\nplt.legend()\nplt.show()"
    )
    charts = [r.chart for r in execution.results if getattr(r, "chart", None) is not None]
    assert charts, execution.results
    chart = charts[0]
    assert chart.type is ChartType.LINE and chart.title == "Growth"
    assert chart.x_label == "day" and chart.y_label == "n"
    assert [e.label for e in chart.elements] == ["growth"]
    assert [tuple(map(float, p)) for p in chart.elements[0].points] == [(1.0, 4.0), (2.0, 5.0), (3.0, 6.0)]
