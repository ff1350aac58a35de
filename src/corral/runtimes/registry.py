"""Lazy registry of runtimes by name ("module:Class" strings, as uvicorn does for apps).

Importing a runtime module only when it is asked for keeps start-up fast and lets a host without runsc or QEMU
use the others. The registry also turns a runtime's ``[runtime.<name>]`` settings table into its typed
``Options`` (a frozen dataclass the runtime class declares) and makes the runtime as ``cls(config, options)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from typing import Any, cast

from corral.errors import InvalidRequest
from corral.runtimes.base import Runtime, RuntimeConfig

__all__ = ["RUNTIMES", "check_options", "load_runtime", "parse_options", "served_levels"]

RUNTIMES: dict[str, str] = {
    "namespace": "corral.runtimes.namespace:NamespaceRuntime",
    "gvisor": "corral.runtimes.gvisor:GVisorRuntime",
    "microvm": "corral.runtimes.microvm.runtime:MicroVMRuntime",
    "fake": "corral.runtimes.fake:FakeRuntime",
    "kubernetes": "corral.runtimes.kubernetes:KubernetesRuntime",  # needs the [k8s] extra (lightkube)
}


def load_runtime(
    name: str,
    config: RuntimeConfig,
    *,
    options: Mapping[str, Any] | None = None,
) -> Runtime:
    """The runtime ``name``, made with ``config`` and its ``[runtime.<name>]`` table ``options``."""
    if name not in RUNTIMES:
        choices = list(RUNTIMES)
        raise InvalidRequest(
            f"unknown runtime {name!r}; choose one of: {', '.join(choices)}", details={"choices": choices}
        )
    cls = _runtime_class(name)
    return cast(Runtime, cls(config, parse_options(cls.Options, options or {}, runtime=name)))


def check_options(tables: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every ``[runtime.<name>]`` table at start-up (a typo fails then, not at the first create)."""
    for name, table in tables.items():
        if name not in RUNTIMES:
            raise InvalidRequest(
                f"settings have a table [runtime.{name}] but there is no runtime {name!r} "
                f"(runtimes: {', '.join(RUNTIMES)})"
            )
        parse_options(_runtime_class(name).Options, table, runtime=name)


def served_levels(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Isolation level -> the runtime that serves it, from the runtimes' ``serves`` options (kubernetes serving
    "gvisor" and "kata-fc" as RuntimeClasses). A level no runtime serves is the runtime of that name."""
    served: dict[str, str] = {}
    for name, table in tables.items():
        for level in getattr(parse_options(_runtime_class(name).Options, table, runtime=name), "serves", ()):
            if level in served and served[level] != name:
                raise InvalidRequest(
                    f"isolation {level!r} is served by both [runtime.{served[level]}] and [runtime.{name}]"
                )
            served[level] = name
    return served


def _runtime_class(name: str) -> Any:
    module_name, _, attr = RUNTIMES[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def parse_options(options_cls: type[Any], table: Mapping[str, Any], *, runtime: str) -> Any:
    """``options_cls(**table)`` with the table checked: unknown keys and values of the wrong type are an
    InvalidRequest naming ``[runtime.<runtime>]``. Strings (from ``CORRAL_RUNTIME_…`` variables) are
    converted to the field's type (int, float, bool)."""
    where = f"[runtime.{runtime}]"
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise InvalidRequest(f"{where} has no option {unknown[0]!r} (its options: {known})")
    hints = typing.get_type_hints(options_cls)
    values = {key: _coerce(value, hints[key], f"{where} {key}") for key, value in table.items()}
    return options_cls(**values)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(value: Any, hint: Any, what: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(k) or k for k in allowed if k is not type(None))
    if value is None and type(None) in allowed:
        return None
    if tuple in kinds:  # a list of names: a TOML array, or "a,b" from a CORRAL_RUNTIME_… variable
        items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(x, str) for x in items):
            return tuple(items)
        raise InvalidRequest(f"{what} must be a list of names, got {value!r}")
    if isinstance(value, str) and str not in kinds:
        for kind in kinds:
            try:
                if kind is bool:
                    return _BOOLS[value.strip().lower()]
                if kind in (int, float):
                    return kind(value)
            except (KeyError, ValueError):
                continue
    if bool in kinds and isinstance(value, bool):
        return value
    if float in kinds and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds):
        return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise InvalidRequest(f"{what} must be {names}, got {value!r}")
