"""Fixtures for the Kubernetes tests: one real CRD API server per session, a fresh namespace per test.

The server's binaries are built by ``scripts/k8s-test-apiserver build`` (scripts/test runs it). When they are
missing the tests skip with that command as the reason; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from .apiserver import CrdApiServer, find_binaries, list_objects

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def k8s_api() -> Iterator[CrdApiServer]:
    """etcd + apiextensions-apiserver on 127.0.0.1 with the agent-sandbox CRDs installed."""
    bin_dir = find_binaries()
    if bin_dir is None:
        reason = "the test CRD API server is not built: run scripts/k8s-test-apiserver build (~4 min, cached)"
        if IN_CI:
            pytest.fail(f"{reason} [CI=true: a missing test requirement is a failure]", pytrace=False)
        pytest.skip(reason)
    server = CrdApiServer(bin_dir=bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def k8s_namespace(k8s_api: CrdApiServer) -> Iterator[str]:
    """A namespace of this test's own (the server has no Namespace objects: any name is usable), checked
    empty at the end: whatever a test's runtime created must be gone by then."""
    namespace = f"t-{secrets.token_hex(4)}"
    yield namespace
    if k8s_api.procs.get("apiserver") is None:  # a test stopped the server and failed before restarting it
        k8s_api.start_apiserver()
    left = list_objects(k8s_api, namespace)
    assert not left, f"Kubernetes objects left behind in {namespace}: {left}"
