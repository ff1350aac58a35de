"""Grouped settings: defaults < TOML file < CORRAL_ env < arguments, and per-runtime tables for the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.core.settings import Settings
from corral.errors import InvalidRequest
from corral.runtimes.base import RuntimeConfig
from corral.runtimes.gvisor import GVisorOptions, GVisorRuntime
from corral.runtimes.registry import load_runtime, parse_options

CONFIG = """
data_dir = "{data}"
[server]
port = 9100
[runtime]
default = "namespace"
enabled = ["namespace", "gvisor"]
node = "node-a"
[runtime.gvisor]
platform = "systrap"
[limits]
memory_mb = 256
[pools]
max_size = 8
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return path


def test_the_file_fills_grouped_settings(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG.format(data=tmp_path / "d"))
    settings = Settings.load(env={}, config=path)
    assert settings.data_dir == tmp_path / "d" and settings.port == 9100
    assert settings.default_isolation == "namespace" and settings.enabled_runtimes == ("namespace", "gvisor")
    assert settings.node == "node-a" and settings.default_limits.memory_mb == 256
    assert settings.max_pool_size == 8
    assert settings.options_for("gvisor") == {"platform": "systrap"}
    assert settings.options_for("namespace") == {}


def test_env_beats_the_file_and_arguments_beat_env(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG.format(data=tmp_path / "d"))
    env = {
        "CORRAL_CONFIG": str(path),
        "CORRAL_PORT": "9200",
        "CORRAL_NODE": "node-b",
        "CORRAL_RUNTIME_GVISOR_PLATFORM": "ptrace",
    }
    settings = Settings.load(env=env)
    assert settings.port == 9200 and settings.node == "node-b"
    assert settings.options_for("gvisor") == {"platform": "ptrace"}
    settings = Settings.load(
        env=env, port=9300, node="node-c", runtime_options={"gvisor": {"platform": "kvm"}}
    )
    assert settings.port == 9300 and settings.node == "node-c"
    assert settings.options_for("gvisor") == {"platform": "kvm"}


def test_the_node_defaults_to_one_per_host_and_data_dir(tmp_path: Path) -> None:
    a = Settings.load(env={}, data_dir=tmp_path / "a")
    assert a.node == Settings.load(env={}, data_dir=tmp_path / "a").node  # stable across restarts
    assert a.node != Settings.load(env={}, data_dir=tmp_path / "b").node
    with pytest.raises(InvalidRequest, match="node id"):
        Settings.load(env={}, data_dir=tmp_path / "a", node="no spaces/or slashes")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nportt = 1\n", r"unknown setting \[server\] portt"),
        ("[server]\nport = 'x'\n", r"\[server\] port .* must be a int"),
        ("[limits]\nmemory = 1\n", r"unknown setting \[limits\] memory"),
        ("[limits]\nmemory_mb = 1\n", "memory_mb must be between"),
        ("port = = 1\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        Settings.load(env={}, config=_write(tmp_path, text))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read the config file"):
        Settings.load(env={}, config=tmp_path / "nope.toml")


def test_the_registry_hands_each_runtime_its_typed_options(tmp_path: Path) -> None:
    config = RuntimeConfig(state_root=tmp_path / "s", cache_root=tmp_path / "c", node="n1")
    runtime = load_runtime("gvisor", config, options={"platform": "systrap", "runsc": "/opt/runsc"})
    assert isinstance(runtime, GVisorRuntime)
    assert runtime.options == GVisorOptions(platform="systrap", runsc="/opt/runsc")
    assert runtime.config.node == "n1"
    assert isinstance(load_runtime("gvisor", config), GVisorRuntime)  # no table: the defaults


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (
            {"platfrom": "ptrace"},
            r"\[runtime.gvisor\] has no option 'platfrom' \(its options: platform, runsc\)",
        ),
        ({"platform": 3}, r"\[runtime.gvisor\] platform must be str"),
        ({"platform": "bogus"}, "platform must be one of ptrace, systrap, kvm"),
    ],
)
def test_bad_runtime_options_are_clear_errors(table: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        parse_options(GVisorOptions, table, runtime="gvisor")


def test_runtimes_without_options_refuse_any(tmp_path: Path) -> None:
    config = RuntimeConfig(state_root=tmp_path / "s", cache_root=tmp_path / "c")
    with pytest.raises(InvalidRequest, match=r"\[runtime.fake\] has no option 'x' \(its options: none\)"):
        load_runtime("fake", config, options={"x": 1})


def test_the_composition_root_checks_every_runtime_table_at_start(tmp_path: Path) -> None:
    from corral.wiring import runtime_loader

    for tables, match in (
        ({"gvisor": {"platfrom": "ptrace"}}, r"\[runtime.gvisor\] has no option 'platfrom'"),
        ({"qemuu": {}}, r"a table \[runtime.qemuu\] but there is no runtime 'qemuu'"),
    ):
        settings = Settings.load(env={}, data_dir=tmp_path, runtime_options=tables)
        with pytest.raises(InvalidRequest, match=match):
            runtime_loader(settings)


def test_e2b_internet_by_default_and_metrics_interval(tmp_path: Path) -> None:
    assert Settings.load(env={}).e2b_internet_by_default is False  # Corral's rule: no network unless asked
    path = _write(tmp_path, "[e2b]\ninternet_by_default = true\n[sandbox]\nmetrics_interval = 2\n")
    settings = Settings.load(env={}, config=path)
    assert settings.e2b_internet_by_default is True and settings.metrics_interval == 2.0
    env = {"CORRAL_CONFIG": str(path), "CORRAL_E2B_INTERNET_BY_DEFAULT": "no"}
    assert Settings.load(env=env).e2b_internet_by_default is False
    with pytest.raises(InvalidRequest, match="must be a bool"):
        Settings.load(env={}, config=_write(tmp_path, '[e2b]\ninternet_by_default = "yes"\n'))
    with pytest.raises(InvalidRequest, match="true or false"):
        Settings.load(env={"CORRAL_E2B_INTERNET_BY_DEFAULT": "maybe"})


def test_kubernetes_serves_isolation_levels_as_runtime_classes(tmp_path: Path) -> None:
    """The same ``isolation="kata-fc"`` on one box and in a cluster: a level is a runtime, or the runtime whose
    ``serves`` names it; several levels share one runtime object (one API client, one reaper pass)."""
    from corral.runtimes.kubernetes import KubernetesRuntime
    from corral.wiring import runtime_loader

    config = _write(tmp_path, '[runtime]\nenabled = ["gvisor", "kata-fc", "namespace"]\ndefault = "kata-fc"\n'
                              '[runtime.kubernetes]\nserves = ["gvisor", "kata-fc"]\n')  # fmt: skip
    runtime_for = runtime_loader(Settings.load(env={}, config=config, data_dir=tmp_path))
    cluster = runtime_for("kata-fc")
    assert isinstance(cluster, KubernetesRuntime) and runtime_for("gvisor") is cluster
    assert cluster.settings.serves == ("gvisor", "kata-fc")
    assert runtime_for("namespace").name == "namespace"  # not served: the local runtime of that name
    with pytest.raises(
        InvalidRequest, match=r"unknown isolation 'microvm'; choose one of: gvisor, kata-fc, names"
    ):
        runtime_for("microvm")  # a runtime, but not enabled here
    with pytest.raises(InvalidRequest, match=r"unknown isolation 'kubernetes'"):
        runtime_for("kubernetes")
    # the same list from the environment, as a Deployment sets it
    env = {"CORRAL_RUNTIMES": "kata-fc", "CORRAL_RUNTIME_KUBERNETES_SERVES": "kata-fc, gvisor"}
    assert isinstance(runtime_loader(Settings.load(env=env, data_dir=tmp_path))("kata-fc"), KubernetesRuntime)


@pytest.mark.parametrize(
    ("enabled", "table", "match"),
    [
        (
            ("kata-fc",),
            {},
            r"\[runtime\] enabled names 'kata-fc', which is no runtime .* and no runtime serves",
        ),
        (
            ("kata-fc",),
            {"serves": ["kata"]},
            r"names isolation 'kata', which has no entry in runtime_classes"
            r" \(entries: gvisor, kata-fc\)",
        ),
        (("kubernetes",), {"isolation": "runc"}, r"names isolation 'runc'"),  # no serves: isolation is used
        (
            ("kata-fc",),
            {"serves": [1, 2]},
            r"\[runtime.kubernetes\] serves must be a list of names, got \[1, 2\]",
        ),
    ],
)
def test_levels_nobody_serves_are_refused_at_start(
    tmp_path: Path, enabled: tuple[str, ...], table: dict[str, object], match: str
) -> None:
    from corral.wiring import runtime_loader

    settings = Settings.load(
        env={}, data_dir=tmp_path, enabled_runtimes=enabled, runtime_options={"kubernetes": table}
    )
    with pytest.raises(InvalidRequest, match=match):
        runtime_loader(settings)


def test_http2_file_env_then_flag(tmp_path: Path) -> None:
    assert Settings.load(env={}).http2 is False  # uvicorn, HTTP/1.1, unless asked
    path = _write(tmp_path, "[server]\nhttp2 = true\n")
    assert Settings.load(env={}, config=path).http2 is True
    env = {"CORRAL_CONFIG": str(path), "CORRAL_SERVER_HTTP2": "off"}
    assert Settings.load(env=env).http2 is False  # the environment over the file
    assert Settings.load(env=env, http2=True).http2 is True  # --http2 over both
    assert Settings.load(env={"CORRAL_SERVER_HTTP2": "1"}, http2=False).http2 is False  # --no-http2
    assert Settings.load(env={"CORRAL_SERVER_HTTP2": "yes"}, http2=None).http2 is True  # no flag given
    with pytest.raises(InvalidRequest, match="must be a bool"):
        Settings.load(env={}, config=_write(tmp_path, '[server]\nhttp2 = "on"\n'))
    with pytest.raises(InvalidRequest, match="CORRAL_SERVER_HTTP2 must be true or false"):
        Settings.load(env={"CORRAL_SERVER_HTTP2": "h2"})
