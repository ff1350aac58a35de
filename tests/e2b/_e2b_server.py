"""What the E2B tests know about their server (the fixture is in this folder's conftest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class E2BServer:
    url: str
    key_a: str  # tenant e2b-a, E2B's form (e2b_…)
    key_b: str  # tenant e2b-b, E2B's form
    corral_key_a: str  # tenant e2b-a again, Corral's own form (corral_…)
    data_dir: Path
