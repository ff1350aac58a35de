"""Code-interpreter wire types: every event survives its JSON form (the HTTP transport)."""

from __future__ import annotations

import json

from corral.models import (
    CodeContext,
    CodeEvent,
    CodeEventKind,
    Execution,
    ExecutionError,
    Result,
    RunCodeParams,
)


def test_code_events_round_trip_through_json() -> None:
    events = [
        CodeEvent(kind=CodeEventKind.STDOUT, text="hi\n", timestamp=1.5),
        CodeEvent(
            kind=CodeEventKind.RESULT,
            result=Result(text="42", png="iVBO", is_main_result=True, extra={"a/b": 1}),
        ),
        CodeEvent(kind=CodeEventKind.ERROR, error=ExecutionError(name="E", value="v", traceback="tb")),
        CodeEvent(kind=CodeEventKind.EXECUTION_COUNT, execution_count=3),
        CodeEvent(kind=CodeEventKind.END, timed_out=True),
    ]
    for event in events:
        assert CodeEvent.from_wire(json.loads(json.dumps(event.to_wire()))) == event


def test_params_and_contexts_round_trip() -> None:
    params = RunCodeParams(code="x", language="js", timeout=2.0)
    assert RunCodeParams.from_wire(json.loads(json.dumps(params.to_wire()))) == params
    ctx = CodeContext(id="ctx-1", language="python", cwd="/home/user")
    assert CodeContext.from_wire(ctx.to_wire()) == ctx


def test_execution_text_is_the_main_result() -> None:
    shown = Result(text="<Figure>", png="x")
    main = Result(text="42", is_main_result=True)
    assert Execution(results=[shown, main]).text == "42"
    assert Execution(results=[shown]).text is None
    assert shown.formats() == ["text", "png"]
