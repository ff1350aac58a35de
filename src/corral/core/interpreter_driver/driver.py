# mypy: ignore-errors
"""Corral's code-interpreter driver. Runs INSIDE a sandbox on the sandbox's own python3 (not the agent's).

The core copies this file (and ``node_driver.js`` beside it) into the sandbox and starts it once per sandbox as
a background process through the agent. It speaks JSON lines: requests on stdin, answers on stdout.

Request  ``{"id": str, "op": str, ...}``. Answer lines repeat ``id`` and carry ``ev``. Every request ends with
exactly one terminal line: ``ok`` (fields depend on the op), ``fail`` (``code``, ``message``) or, for
``execute``, ``end`` (``timed_out``). An ``execute`` first streams ``stdout``/``stderr`` (``text``),
``context`` (the context it runs in), ``result`` (``result``: MIME fields), ``error`` (``name``, ``value``, ``traceback``) and ``execution_count``.

Contexts: ``python`` is a real IPython kernel (ipykernel via jupyter_client, imported only when a Python
context is made, so JavaScript and Bash work in sandboxes without Jupyter); ``javascript`` is a persistent
Node process running ``node_driver.js`` (``vm.runInThisContext``); ``bash`` is a persistent bash reading cells
from a pipe. Interrupting (or a timeout) sends SIGINT to the context's process, which aborts the running cell
and keeps the context's state.

Output isolation: the answer channel is a private duplicate of stdout; fd 1 and 2 are pointed at /dev/null
before any kernel starts, so code in a context cannot write protocol lines by printing. Children of the
context (same uid) could still reach this process through /proc; that only garbles their own sandbox's
interpreter, and the host treats every line as untrusted anyway.

Only one driver runs per sandbox: it holds an flock on LOCK_PATH; a second one exits with status 3.
"""

import contextlib
import fcntl
import json
import os
import queue
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback

LOCK_PATH = "/tmp/.corral-interpreter.lock"
HERE = os.path.dirname(os.path.abspath(__file__))
LANGUAGES = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "javascript": "javascript",
    "js": "javascript",
    "node": "javascript",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
}
INTERRUPT_GRACE = 10.0  # seconds a context gets to finish its cell after SIGINT before it is restarted
MAX_CODE = 4 << 20

_out_lock = threading.Lock()
_out = None


def emit(rid, ev, **fields):
    line = json.dumps({"id": rid, "ev": ev, **fields}, default=str, separators=(",", ":")) + "\n"
    with _out_lock:
        _out.write(line.encode())
        _out.flush()


class Fail(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


# --- results ----------------------------------------------------------------------------------------------

_MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


def result_from_mime(data, is_main):
    out = {"is_main_result": is_main, "extra": {}}
    for mime, value in data.items():
        field = _MIME_FIELDS.get(mime)
        if field is None:
            out["extra"][mime] = value
        else:
            out[field] = value
    return out


# --- Python: an IPython kernel ----------------------------------------------------------------------------

_PY_SETUP = r"""
def __corral_setup():
    import json
    from IPython import get_ipython
    from IPython.core.formatters import JSONFormatter
    from traitlets import ObjectName, Unicode

    class DataFormatter(JSONFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")

    ip = get_ipython()
    fmt = DataFormatter(parent=ip.display_formatter)
    ip.display_formatter.formatters["e2b/data"] = fmt
    if "e2b/data" not in ip.display_formatter.active_types:
        ip.display_formatter.active_types.append("e2b/data")

    def frame(df):
        return json.loads(df.to_json(orient="split", date_format="iso", default_handler=str))

    for module in ("pandas", "pandas.core.frame", "pandas.core.series"):  # pandas 3 says "pandas"
        fmt.for_type_by_name(module, "DataFrame", frame)
        fmt.for_type_by_name(module, "Series", frame)

    class ChartFormatter(JSONFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")

    charts = ChartFormatter(parent=ip.display_formatter)
    ip.display_formatter.formatters["e2b/chart"] = charts
    if "e2b/chart" not in ip.display_formatter.active_types:
        ip.display_formatter.active_types.append("e2b/chart")

    # A matplotlib figure's data as E2B's chart JSON, from the e2b-charts package where the template has it.
    # Through the figure's own _repr_e2b_chart_ method: matplotlib's inline backend removes every formatter's
    # printer for Figure when it starts (IPython's select_figure_formats), but leaves methods alone.
    import importlib.util

    if importlib.util.find_spec("e2b_charts") is not None:
        import matplotlib.figure

        def chart(figure):
            from e2b_charts import chart_figure_to_dict

            try:
                return chart_figure_to_dict(figure) or None
            except Exception:  # a figure the extractor does not understand still shows as an image
                return None

        matplotlib.figure.Figure._repr_e2b_chart_ = chart
__corral_setup()
del __corral_setup
"""


# A cell's own environment variables (E2B's env_vars): set in the kernel before it, put back after it.
_PY_ENV_SET = """\
import json as __corral_json, os as __corral_os
__corral_env = __corral_json.loads(%s)
__corral_env_saved = {k: __corral_os.environ.get(k) for k in __corral_env}
__corral_os.environ.update(__corral_env)
del __corral_json, __corral_env
"""
_PY_ENV_RESTORE = """\
for __corral_k, __corral_v in __corral_env_saved.items():
    if __corral_v is None:
        __corral_os.environ.pop(__corral_k, None)
    else:
        __corral_os.environ[__corral_k] = __corral_v
del __corral_env_saved, __corral_os
"""


class PythonContext:
    language = "python"

    def __init__(self, cwd):
        try:
            from jupyter_client.manager import KernelManager
        except ImportError:
            raise Fail(
                "unsupported",
                "this sandbox has no Jupyter kernel for Python; create it from the "
                "code-interpreter template (corral template build-code-interpreter)",
            ) from None
        self.cwd = cwd
        self.km = KernelManager(kernel_name="python3")
        self.kc = None
        self._start()

    def _start(self):
        env = dict(os.environ)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        self.km.start_kernel(
            cwd=self.cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self._run_silent(_PY_SETUP)

    def _run_silent(self, code):
        msg_id = self.kc.execute(code, silent=True, store_history=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = self._iopub(0.5)
            if msg and msg["parent_header"].get("msg_id") == msg_id and _idle(msg):
                return

    def _iopub(self, timeout):
        try:
            return self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None

    def interrupt(self):
        self.km.interrupt_kernel()

    def execute(self, rid, code, ctl, envs):
        if envs:
            self._run_silent(_PY_ENV_SET % json.dumps(json.dumps(envs)))
        try:
            self._execute(rid, code, ctl)
        finally:
            if envs:
                self._run_silent(_PY_ENV_RESTORE)

    def _execute(self, rid, code, ctl):
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        while True:
            msg = self._iopub(0.2)
            if ctl.check(self):
                return
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                emit(rid, "stdout" if content.get("name") == "stdout" else "stderr", text=content["text"])
            elif kind in ("execute_result", "display_data"):
                emit(
                    rid, "result", result=result_from_mime(content.get("data", {}), kind == "execute_result")
                )
            elif kind == "error":
                ctl.error(
                    rid,
                    content.get("ename", ""),
                    content.get("evalue", ""),
                    "\n".join(content.get("traceback", [])),
                )
            elif kind == "execute_input":
                emit(rid, "execution_count", execution_count=content.get("execution_count"))
            elif _idle(msg):
                self._drain_shell()
                return

    def _drain_shell(self):
        while True:
            try:
                self.kc.get_shell_msg(timeout=0.01)
            except queue.Empty:
                return

    def restart(self):
        self.km.restart_kernel(now=True)
        self.kc.stop_channels()
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self._run_silent(_PY_SETUP)

    def close(self):
        if self.kc is not None:
            self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _idle(msg):
    return msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle"


# --- JavaScript and Bash: a child process with a control pipe ---------------------------------------------


class PipeContext:
    """A persistent child whose stdout/stderr become the cell's streams; cell boundaries travel on a pipe.

    The child writes one JSON line per finished cell to the fd named by CORRAL_CTL_FD. Its stdout and stderr
    writes for that cell are complete before it does (Node writes pipes synchronously on Linux; bash waits
    for its commands), so after the control line we drain whatever is left in the output pipes.
    """

    def __init__(self, cwd):
        self.cwd = cwd
        self.proc = None
        self._start()

    def _start(self):
        ctl_r, ctl_w = os.pipe()
        env = dict(os.environ, CORRAL_CTL_FD=str(ctl_w))
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(ctl_w,),
            start_new_session=True,
        )
        os.close(ctl_w)
        self.ctl = os.fdopen(ctl_r, "rb", buffering=0)
        self._ctl_buf = b""
        for f in (self.proc.stdout, self.proc.stderr, self.ctl):
            os.set_blocking(f.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        self.sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.count = 0

    def interrupt(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)

    def execute(self, rid, code, ctl, envs):
        self.count += 1
        emit(rid, "execution_count", execution_count=self.count)
        self.send_cell(code, envs)
        while True:
            if ctl.check(self):
                return
            if self.proc.poll() is not None:
                emit(
                    rid,
                    "error",
                    name="ContextDied",
                    value=f"the {self.language} process exited ({self.proc.returncode}); restart the context",
                    traceback="",
                )
                return
            for key, _ in self.sel.select(0.2):
                if key.data == "ctl":
                    done = self._read_ctl()
                    if done is not None:
                        self._drain(rid)
                        self.finish(rid, done, ctl)
                        return
                else:
                    self._pump(rid, key.fileobj, key.data)

    def _read_ctl(self):
        try:
            chunk = os.read(self.ctl.fileno(), 65536)
        except BlockingIOError:
            return None
        if not chunk:
            return None
        self._ctl_buf += chunk
        if b"\n" not in self._ctl_buf:
            return None
        line, self._ctl_buf = self._ctl_buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return {}

    def _pump(self, rid, f, name):
        try:
            data = os.read(f.fileno(), 65536)
        except BlockingIOError:
            return False
        if data:
            emit(rid, name, text=data.decode(errors="replace"))
        return bool(data)

    def _drain(self, rid):
        for f, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            while self._pump(rid, f, name):
                pass

    def restart(self):
        self.close()
        self._start()

    def close(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr, self.ctl):
            f.close()


class JavaScriptContext(PipeContext):
    language = "javascript"

    def argv(self):
        return ["node", os.path.join(HERE, "node_driver.js")]

    def send_cell(self, code, envs):
        self.proc.stdin.write(json.dumps({"code": code, "env": envs}).encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, rid, done, ctl):
        if done.get("result") is not None:
            emit(rid, "result", result={"is_main_result": True, "text": done["result"], "extra": {}})
        if done.get("error"):
            err = done["error"]
            ctl.error(rid, err.get("name", "Error"), err.get("value", ""), err.get("traceback", ""))


def _sh_quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


class BashContext(PipeContext):
    language = "bash"

    def argv(self):
        return ["bash", "--norc", "--noprofile", "-s"]

    def _start(self):
        super()._start()
        self.cells = os.path.join("/tmp", f".corral-bash-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.cells, 0o700)
        # an interrupted cell stops where it is and returns 130; the shell and its variables stay
        self.proc.stdin.write(b'trap "return 130" INT\n')
        self.proc.stdin.flush()

    def send_cell(self, code, envs):
        path = os.path.join(self.cells, "cell.sh")
        with open(path, "w") as f:
            f.write(code + "\n")
        quoted = "'" + path.replace("'", "'\\''") + "'"
        # assignments before a builtin last for that command only (and reach its children): the cell's envs
        prefix = "".join(f"{k}={_sh_quote(v)} " for k, v in envs.items())
        self.proc.stdin.write(
            f'{prefix}. {quoted} </dev/null; printf \'{{"status":%d}}\\n\' "$?" >&"$CORRAL_CTL_FD"\n'.encode()
        )
        self.proc.stdin.flush()

    def finish(self, rid, done, ctl):
        status = done.get("status", 0)
        if status:
            ctl.error(rid, "Error", f"exit status {status}", "")

    def close(self):
        super().close()
        subprocess.run(["rm", "-rf", self.cells], check=False)


KINDS = {"python": PythonContext, "javascript": JavaScriptContext, "bash": BashContext}


# --- the driver -------------------------------------------------------------------------------------------


class Control:
    """Deadline and interrupt state of one running cell; ``check`` is polled by the cell's loop."""

    def __init__(self, timeout):
        self.deadline = time.monotonic() + timeout if timeout else None
        self.interrupted_at = None
        self.timed_out = False
        self.given_up = False

    def check(self, ctx):
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline and self.interrupted_at is None:
            self.timed_out = True
            self.interrupt(ctx)
        if self.interrupted_at is not None and now - self.interrupted_at > INTERRUPT_GRACE:
            self.given_up = True
            return True
        return False

    def error(self, rid, name, value, tb):
        """Report the cell's error; a timed-out cell reports the timeout instead of the interrupt."""
        if not self.timed_out:
            emit(rid, "error", name=name, value=value, traceback=tb)

    def interrupt(self, ctx):
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
        ctx.interrupt()


class Entry:
    def __init__(self, cid, language, cwd, ctx):
        self.id, self.language, self.cwd, self.ctx = cid, language, cwd, ctx
        self.lock = threading.Lock()  # one cell at a time; later ones wait their turn
        self.running = None  # Control of the running cell

    def info(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Driver:
    def __init__(self):
        self.contexts = {}
        self.defaults = {}
        self.lock = threading.Lock()

    def language(self, value):
        lang = LANGUAGES.get(str(value or "python").lower())
        if lang is None:
            raise Fail("invalid", f"unknown language {value!r}; choose python, javascript or bash")
        return lang

    def entry(self, cid):
        entry = self.contexts.get(cid)
        if entry is None:
            raise Fail("not_found", f"code context {cid} not found")
        return entry

    def create(self, language, cwd):
        lang = self.language(language)
        cwd = cwd or os.environ.get("HOME") or "/"
        if not os.path.isdir(cwd):
            raise Fail("not_found", f"working directory {cwd} does not exist")
        ctx = KINDS[lang](cwd)
        entry = Entry("ctx-" + secrets.token_hex(8), lang, cwd, ctx)
        with self.lock:
            self.contexts[entry.id] = entry
        return entry

    def default(self, language):
        lang = self.language(language)
        with self.lock:
            cid = self.defaults.get(lang)
            if cid in self.contexts:
                return self.contexts[cid]
        entry = self.create(lang, None)
        with self.lock:
            if self.defaults.get(lang) in self.contexts:  # another request made it first
                threading.Thread(target=entry.ctx.close, daemon=True).start()
                self.contexts.pop(entry.id, None)
                return self.contexts[self.defaults[lang]]
            self.defaults[lang] = entry.id
        return entry

    def handle(self, req):
        rid, op = req.get("id"), req.get("op")
        try:
            if op == "ping":
                emit(rid, "ok", pid=os.getpid())
            elif op == "create_context":
                emit(rid, "ok", context=self.create(req.get("language"), req.get("cwd")).info())
            elif op == "list_contexts":
                emit(rid, "ok", contexts=[e.info() for e in list(self.contexts.values())])
            elif op == "interrupt_context":
                entry = self.entry(req.get("context_id"))
                if entry.running is not None:
                    entry.running.interrupt(entry.ctx)
                emit(rid, "ok")
            elif op == "restart_context":
                entry = self.entry(req.get("context_id"))
                if entry.running is not None:
                    entry.running.interrupt(entry.ctx)
                with entry.lock:
                    entry.ctx.restart()
                emit(rid, "ok")
            elif op == "remove_context":
                entry = self.entry(req.get("context_id"))
                with self.lock:
                    self.contexts.pop(entry.id, None)
                    self.defaults = {k: v for k, v in self.defaults.items() if v != entry.id}
                if entry.running is not None:
                    entry.running.interrupt(entry.ctx)
                entry.ctx.close()
                emit(rid, "ok")
            elif op == "execute":
                self.execute(rid, req)
            else:
                raise Fail("unknown_op", f"unknown op {op!r}")
        except Fail as exc:
            emit(rid, "fail", code=exc.code, message=exc.message)
        except Exception as exc:  # report, keep serving the other contexts
            emit(
                rid,
                "fail",
                code="internal",
                message=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )

    def execute(self, rid, req):
        code = req.get("code")
        if not isinstance(code, str) or len(code) > MAX_CODE:
            raise Fail("invalid", "code must be a string of at most 4 MiB")
        envs = req.get("envs") or {}
        if not isinstance(envs, dict) or not all(
            isinstance(k, str) and k.isidentifier() and k.isascii() and isinstance(v, str)
            for k, v in envs.items()
        ):
            raise Fail("invalid", "envs must map variable names to strings")
        cid = req.get("context_id")
        entry = self.entry(cid) if cid else self.default(req.get("language"))
        timeout = req.get("timeout")
        emit(rid, "context", context=entry.info())
        with entry.lock:
            ctl = Control(timeout if isinstance(timeout, (int, float)) and timeout > 0 else None)
            entry.running = ctl
            try:
                entry.ctx.execute(rid, code, ctl, envs)
            finally:
                entry.running = None
            if ctl.given_up:  # the cell ignored SIGINT: only a restart gets the context back
                emit(
                    rid,
                    "error",
                    name="TimeoutError" if ctl.timed_out else "KeyboardInterrupt",
                    value="the cell did not stop when interrupted; the context was restarted",
                    traceback="",
                )
                entry.ctx.restart()
            elif ctl.timed_out:
                emit(
                    rid,
                    "error",
                    name="TimeoutError",
                    value=f"execution timed out after {timeout:g} s and was interrupted",
                    traceback="",
                )
        emit(rid, "end", timed_out=ctl.timed_out)


def main():
    global _out
    lock = open(LOCK_PATH, "a")  # noqa: SIM115 - held open (and locked) for the driver's whole life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(3)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # children must not inherit an ignored SIGINT
    _out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    driver = Driver()
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
        except ValueError:
            continue
        if isinstance(req, dict):
            threading.Thread(target=driver.handle, args=(req,), daemon=True).start()
    for entry in list(driver.contexts.values()):
        entry.ctx.close()


if __name__ == "__main__":
    main()
