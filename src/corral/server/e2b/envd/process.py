"""envd's ``process.Process`` service over Corral's processes and terminals (``SandboxService.exec``, …).

Mapping (one Corral operation per RPC; no process semantics of our own):

- ``Start`` runs the command as a *background* Corral process (``timeout`` = the request's
  ``Connect-Timeout-Ms``, envd's rule: a client that leaves does not kill it, its deadline does) and follows
  it with ``attach``, which replays its kept output from the first byte, so nothing between start and
  attach is lost. With ``pty`` it opens a Corral terminal instead. The stream is ``start{pid}``, ``data``,
  ``end``, with keep-alives in the gaps.
- ``Connect`` is ``attach`` (Corral replays the kept output first, then follows; an exited process answers
  with its output and its ``end``).
- Processes are picked by envd's selector: a pid or a tag, resolved through ``list_processes`` (running
  processes first). Corral's own code-interpreter driver is not shown by ``List``.
- ``SendInput``/``StreamInput``/``CloseStdin`` are ``send_stdin``; ``SendSignal`` is ``signal``;
  ``Update`` is ``resize_pty``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from corral.core.interpreter import TAG as INTERPRETER_TAG
from corral.errors import NotFound
from corral.models import EventKind, ExecParams, ProcessEvent, ProcessInfo, PtyParams
from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._connect import (
    Kind,
    Row,
    Rpc,
    keepalive_interval,
    table,
    timeout_of,
    user_of,
    with_keepalive,
)
from corral.server.e2b.envd._pb import process_pb2 as pb

__all__ = ["SERVICE", "rpcs"]

SERVICE = "process.Process"
_SIGNALS = {pb.SIGNAL_SIGKILL: 9, pb.SIGNAL_SIGTERM: 15}
_OUTPUT = {EventKind.STDOUT: "stdout", EventKind.STDERR: "stderr", EventKind.PTY: "pty"}


def _end(event: ProcessEvent) -> pb.ProcessEvent:
    """envd's end event: Go's ``ProcessState`` wording (``exit status N``, ``signal: killed``)."""
    if event.signal is not None:
        name = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup"}.get(
            event.signal, str(event.signal)
        )
        end = pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=f"signal: {name}")
    else:
        code = event.exit_code if event.exit_code is not None else -1
        end = pb.ProcessEvent.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")
    if event.timed_out:
        end.error = "the process reached its timeout and was killed"
    return pb.ProcessEvent(end=end)


def _keepalive() -> pb.ProcessEvent:
    return pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())


async def _follow(
    first: pb.ProcessEvent, events: AsyncIterator[ProcessEvent]
) -> AsyncIterator[pb.ProcessEvent]:
    """``first`` (the start event), then a Corral attach stream as envd events, until the process ends."""
    yield first
    try:
        async for event in events:
            field = _OUTPUT.get(event.kind)
            if field is not None and event.data:
                yield pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(**{field: event.data}))
            elif event.kind is EventKind.EXIT:
                yield _end(event)
                return
    finally:
        await events.aclose()  # type: ignore[attr-defined]


class _Process:
    def __init__(self, call: SandboxCall) -> None:
        self.call = call
        self.service = call.service
        self.kw: dict[str, Any] = {"tenant": call.tenant}

    async def _find(self, selector: pb.ProcessSelector) -> ProcessInfo:
        which = selector.WhichOneof("selector")
        if which is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "select a process by pid or by tag")
        processes = await self.service.list_processes(self.call.sandbox_id, **self.kw)
        wanted = [
            p for p in processes if (p.pid == selector.pid if which == "pid" else p.tag == selector.tag)
        ]
        wanted.sort(key=lambda p: (p.running, p.started_at), reverse=True)  # running, then the newest
        if not wanted:
            what = f"pid {selector.pid}" if which == "pid" else f"tag {selector.tag!r}"
            raise NotFound(f"process with {what} not found")
        return wanted[0]

    async def _running(self, selector: pb.ProcessSelector) -> ProcessInfo:
        proc = await self._find(selector)
        if not proc.running:
            raise NotFound(f"process with pid {proc.pid} not found (it has exited)")
        return proc

    async def _attach(self, process_id: str) -> AsyncIterator[ProcessEvent]:
        events = await self.service.attach(self.call.sandbox_id, process_id, **self.kw)
        async for event in events:  # attach opens with its own ``started``: the caller made envd's start
            if event.kind is not EventKind.STARTED:
                yield event

    # -- RPCs ----------------------------------------------------------------------------------------------
    async def start(
        self, req: pb.StartRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.StartResponse]:
        user = user_of(ctx.request_headers)
        config = req.process
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        argv = [config.cmd, *config.args]
        timeout = timeout_of(ctx)
        if timeout is not None:
            timeout = min(timeout, self.service.settings.max_timeout)
        cwd = config.cwd if config.HasField("cwd") else None
        tag = req.tag if req.HasField("tag") else None
        if req.HasField("pty"):
            size = req.pty.size
            started = await self.service.create_pty(
                self.call.sandbox_id,
                PtyParams(
                    cols=size.cols or 80,
                    rows=size.rows or 24,
                    argv=argv,
                    env=dict(config.envs),
                    cwd=cwd,
                    user=user,
                    timeout=timeout,
                    tag=tag,
                ),
                **self.kw,
            )
            process_id, pid = started.process_id, started.pid
        else:
            params = ExecParams(
                argv=argv,
                env=dict(config.envs),
                cwd=cwd,
                user=user,
                timeout=timeout,
                stdin=req.stdin if req.HasField("stdin") else True,  # envd's default; the SDK sends false
                background=True,
                tag=tag,
            )
            process_id, pid = None, None
            launch = await self.service.exec(self.call.sandbox_id, params, **self.kw)
            try:
                async for event in launch:
                    if event.kind is EventKind.STARTED:
                        process_id, pid = event.process_id, event.pid
            finally:
                await launch.aclose()  # type: ignore[attr-defined]
        if process_id is None or pid is None:
            raise ConnectError(Code.INTERNAL, "the process did not start")
        first = pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=pid))
        stream = with_keepalive(_follow(first, self._attach(process_id)), keepalive_interval(ctx), _keepalive)
        async for message in stream:
            yield pb.StartResponse(event=message)

    async def connect(
        self, req: pb.ConnectRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.ConnectResponse]:
        proc = await self._find(req.process)
        first = pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=proc.pid))
        stream = with_keepalive(
            _follow(first, self._attach(proc.process_id)), keepalive_interval(ctx), _keepalive
        )
        async for message in stream:
            yield pb.ConnectResponse(event=message)

    async def list(self, req: pb.ListRequest, ctx: RequestContext[Any, Any]) -> pb.ListResponse:
        processes = await self.service.list_processes(self.call.sandbox_id, **self.kw)
        out = pb.ListResponse()
        for p in processes:
            if not p.running or p.tag == INTERPRETER_TAG or not p.argv:
                continue
            info = out.processes.add(pid=p.pid)
            info.config.cmd = p.argv[0]
            info.config.args.extend(p.argv[1:])
            if p.cwd:
                info.config.cwd = p.cwd
            if p.tag is not None:
                info.tag = p.tag
        return out

    async def send_input(
        self, req: pb.SendInputRequest, ctx: RequestContext[Any, Any]
    ) -> pb.SendInputResponse:
        proc = await self._running(req.process)
        data = req.input.stdin if req.input.WhichOneof("input") == "stdin" else req.input.pty
        await self.service.send_stdin(self.call.sandbox_id, proc.process_id, data, **self.kw)
        return pb.SendInputResponse()

    async def stream_input(
        self, requests: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext[Any, Any]
    ) -> pb.StreamInputResponse:
        proc: ProcessInfo | None = None
        async for req in requests:
            which = req.WhichOneof("event")
            if which == "start":
                proc = await self._running(req.start.process)
            elif which == "data":
                if proc is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "the first message must be start{process}")
                data = (
                    req.data.input.stdin
                    if req.data.input.WhichOneof("input") == "stdin"
                    else req.data.input.pty
                )
                if data:
                    await self.service.send_stdin(self.call.sandbox_id, proc.process_id, data, **self.kw)
        return pb.StreamInputResponse()

    async def send_signal(
        self, req: pb.SendSignalRequest, ctx: RequestContext[Any, Any]
    ) -> pb.SendSignalResponse:
        signal = _SIGNALS.get(req.signal)
        if signal is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        proc = await self._running(req.process)
        await self.service.signal(self.call.sandbox_id, proc.process_id, signal, **self.kw)
        return pb.SendSignalResponse()

    async def close_stdin(
        self, req: pb.CloseStdinRequest, ctx: RequestContext[Any, Any]
    ) -> pb.CloseStdinResponse:
        proc = await self._running(req.process)
        await self.service.send_stdin(self.call.sandbox_id, proc.process_id, b"", eof=True, **self.kw)
        return pb.CloseStdinResponse()

    async def update(self, req: pb.UpdateRequest, ctx: RequestContext[Any, Any]) -> pb.UpdateResponse:
        proc = await self._running(req.process)
        if req.HasField("pty"):
            size = req.pty.size
            await self.service.resize_pty(
                self.call.sandbox_id, proc.process_id, size.cols, size.rows, **self.kw
            )
        return pb.UpdateResponse()


def rpcs(call: SandboxCall) -> list[Rpc]:
    p = _Process(call)
    unary: list[Row] = [
        ("List", pb.ListRequest, pb.ListResponse, p.list),
        ("SendInput", pb.SendInputRequest, pb.SendInputResponse, p.send_input),
        ("SendSignal", pb.SendSignalRequest, pb.SendSignalResponse, p.send_signal),
        ("CloseStdin", pb.CloseStdinRequest, pb.CloseStdinResponse, p.close_stdin),
        ("Update", pb.UpdateRequest, pb.UpdateResponse, p.update),
    ]
    streams: list[Row] = [
        ("Start", pb.StartRequest, pb.StartResponse, p.start),
        ("Connect", pb.ConnectRequest, pb.ConnectResponse, p.connect),
    ]
    inputs: list[Row] = [("StreamInput", pb.StreamInputRequest, pb.StreamInputResponse, p.stream_input)]
    return [
        *table(Kind.UNARY, unary),
        *table(Kind.SERVER_STREAM, streams),
        *table(Kind.CLIENT_STREAM, inputs),
    ]
