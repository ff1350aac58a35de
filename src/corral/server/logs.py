"""The server's logs: JSON for machines, one line a person can read on a terminal.

One object per line (``json``) is what log shippers and ``jq`` want, and what ``corral serve`` writes when
its stderr is a pipe or a file, or to ``--log-file``. On a terminal (``auto``, the default, when stderr is a
TTY) each record is ``HH:MM:SS LEVEL logger: message key=value ...`` instead, with the same fields, so a person
running the server by hand is not handed a stream of JSON.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from pythonjsonlogger.json import JsonFormatter

__all__ = ["FORMATS", "HumanFormatter", "configure_json_logging", "configure_logging"]

FORMATS = ("auto", "json", "text")
# attributes every LogRecord has; anything else on a record came from ``extra=`` and is shown as key=value
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def _json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure_logging(
    level: int = logging.INFO, *, fmt: str = "auto", file: str | None = None, stream: IO[str] | None = None
) -> None:
    """Send every log record to ``file`` (appended) or ``stream`` (default stderr), as ``fmt``: ``json``,
    ``text``, or ``auto`` (text on a terminal, JSON otherwise; a file is never a terminal)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(out)
    human = fmt == "text" or (fmt == "auto" and not file and out.isatty())
    handler.setFormatter(HumanFormatter() if human else _json_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # replaced by corral.server.access, with more fields


def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON on stderr, whatever it is."""
    configure_logging(level, fmt="json")
