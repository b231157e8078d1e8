"""The version bounds pyproject.toml states are the ones `.ci/lowest` tests: every lower bound is
pinned in .ci/lowest.txt, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
NOT_PINNED = {"torch", "trl"}  # torch: only its local CPU build installs here; trl: the benchmark's baseline


def _lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = project["dependencies"] + extras["eval"] + extras["dev"] + extras["trackers"]
    bounds = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        lows = [spec.version for spec in req.specifier if spec.operator == ">="]
        assert len(lows) == 1, f"pyproject.toml: {line!r} needs exactly one lower bound (>=)"
        if name not in NOT_PINNED:
            bounds[name] = Version(lows[0])
    return bounds


def _pins() -> dict[str, Version]:
    pins = {}
    for number, raw in enumerate((ROOT / ".ci" / "lowest.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f".ci/lowest.txt:{number}: {raw!r} is not NAME==VERSION"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def test_every_lower_bound_is_pinned_for_the_lowest_versions_check():
    bounds, pins = _lower_bounds(), _pins()
    assert "transformers" in bounds and "peft" in bounds  # the parse found the dependencies
    mismatched = {name: (str(low), str(pins.get(name))) for name, low in bounds.items() if pins.get(name) != low}
    assert not mismatched, f"pyproject.toml lower bound vs .ci/lowest.txt pin: {mismatched}"
    assert set(pins) == set(bounds), f".ci/lowest.txt pins what pyproject.toml does not bound: {set(pins) - set(bounds)}"


def test_the_lowest_versions_check_installs_from_the_pins():
    script = (ROOT / ".ci" / "lowest").read_text()
    assert "-c .ci/lowest.txt" in script and "pytest" in script
