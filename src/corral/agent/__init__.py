"""The in-sandbox agent: executes processes and file operations for the host, over the agent protocol.

It runs inside every sandbox, whatever the isolation, as ``python3 -I -S -B -m corral.agent`` with a bundled
interpreter (see ``corral.runtimes._bundle``), so it uses the standard library and ``corral.protocol`` only.
``spec/agent-protocol.md`` is the normative description of what it does; the modules are:

- ``__main__``: command line, transports (stdio by default, ``--listen unix:PATH`` / ``tcp:HOST:PORT``); it sends
  the stdio ``hello`` before importing anything heavy, because time-to-hello is on the path of every create.
- ``loop``: a small single-threaded ``selectors`` event loop with timers and signal wake-ups.
- ``server``: per-connection framing, output queues with back-pressure, and the op -> handler table.
- ``process``: spawning, output rings, streaming to subscribers, reaping, timeouts, signals.
- ``files`` / ``worker``: file operations, run in forked worker processes with the caller's uid.
- ``users``: the unprivileged ``user`` account.

This package module stays import-free: it is imported before the stdio ``hello`` is sent.
"""

__all__ = ["AGENT_VERSION"]

AGENT_VERSION = "0.1.0"
