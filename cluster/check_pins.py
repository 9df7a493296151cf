"""Check that the installed distributions match every ``name==version`` pin of pyproject.toml.

    python cluster/check_pins.py [path/to/pyproject.toml]

Run by cluster/Dockerfile and the cluster launcher's setup commands after installing rlrestore,
so an image or a node whose resolver picked anything else than the pinned versions (an index
mirror, a pre-installed package pip decided to keep) fails at build time, not halfway into a run.
Exit status 0 when every pin is met, 1 with one line per mismatch otherwise.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*(?:;.*)?$")


def pinned(pyproject: Path) -> dict[str, str]:
    """``{distribution: version}`` of the exact pins in ``[project].dependencies`` plus the project itself."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = {project["name"]: project["version"]}
    for requirement in project.get("dependencies", []):
        match = PIN.match(requirement)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def mismatches(pins: dict[str, str]) -> list[str]:
    """One message per pin the current environment does not meet."""
    problems = []
    for name, wanted in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (pyproject.toml pins {wanted})")
            continue
        if installed != wanted:
            problems.append(f"{name}: {installed} installed, pyproject.toml pins {wanted}")
    return problems


def main(argv: list[str]) -> int:
    pyproject = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
    pins = pinned(pyproject)
    problems = mismatches(pins)
    for line in problems:
        print(f"check_pins: {line}", file=sys.stderr)
    if not problems:
        print(f"check_pins: all {len(pins)} pins of {pyproject} are installed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
