"""Dependencies point one way: core <- roles <- orchestration.

Layers (by module name):

- core: ``rlrestore.*`` outside ``rlrestore.orchestration`` (config, data, policy, flow and NFT
  math, tracking, checkpoints, runtime helpers);
- roles: ``rollouts.*``, ``rewards.*``, ``trainers.*`` (one package per Ray actor role);
- orchestration: ``rlrestore.orchestration.*`` (stage drivers, eval, bench, demo, CLI), and
  ``rlrestore.__main__`` (``python -m rlrestore``, the CLI's entry point).

The core imports no role and no orchestration; a role imports the core and itself, never another
role nor the orchestration; the orchestration may import anything. Every import counts, including
those inside functions and under ``TYPE_CHECKING``. Imports are read with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlrestore", "rollouts", "rewards", "trainers")
ROLES = ("rollouts", "rewards", "trainers")
ORCHESTRATION = "rlrestore.orchestration"
ENTRY_POINTS = ("rlrestore.__main__",)


@dataclass(frozen=True)
class WrongArrow:
    """An import that points the wrong way between layers."""

    module: str
    line: int
    imported: str
    reason: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.reason}"


def layer(module: str) -> str | None:
    """``core``, a role's package name, ``orchestration``, or None for a module outside the project."""
    top = module.split(".")[0]
    if module in ENTRY_POINTS or module == ORCHESTRATION or module.startswith(ORCHESTRATION + "."):
        return "orchestration"
    if top == "rlrestore":
        return "core"
    if top in ROLES:
        return top
    return None


def imported_names(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, at any depth; ``from m import n`` gives ``m.n``."""
    package = module if is_package else module.rpartition(".")[0]
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return names


def wrong_arrows(module: str, source: str, is_package: bool = False) -> list[WrongArrow]:
    """The imports of ``module`` (its text ``source``) that break the layer rule."""
    importer = layer(module)
    arrows = []
    for line, name in imported_names(module, source, is_package):
        target = layer(name)
        if importer is None or target is None or target in (importer, "core"):
            continue
        if importer == "orchestration":
            continue
        if importer == "core":
            reason = f"the core may not import {'the orchestration' if target == 'orchestration' else 'a role'}"
        elif target == "orchestration":
            reason = "a role may not import the orchestration"
        else:
            reason = f"the {importer} role may not import another role ({target}); move the shared code to the core"
        arrows.append(WrongArrow(module, line, name, reason))
    return arrows


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four top-level packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def test_every_import_points_down() -> None:
    modules = project_modules()
    assert {"rlrestore.config", "rollouts.worker", "rewards.base", "rlrestore.orchestration.cli"} <= set(modules)
    arrows = [
        arrow
        for module, path in modules.items()
        for arrow in wrong_arrows(module, path.read_text(), path.name == "__init__.py")
    ]
    assert not arrows, "imports pointing the wrong way:\n" + "\n".join(map(str, arrows))


def test_the_checker_catches_planted_wrong_arrows() -> None:
    source = (
        "from rlrestore.config import RunConfig\n"
        "import rewards.base\n"
        "def late():\n"
        "    from trainers.stage1 import train_stage1_worker\n"
        "    from rlrestore.orchestration import stage2\n"
    )
    assert [(a.line, a.imported) for a in wrong_arrows("rewards.worker", source)] == [
        (4, "trainers.stage1.train_stage1_worker"),
        (5, "rlrestore.orchestration.stage2"),
    ]
    core = wrong_arrows("rlrestore.data.shards", source)
    assert [(a.line, a.imported) for a in core] == [
        (2, "rewards.base"),
        (4, "trainers.stage1.train_stage1_worker"),
        (5, "rlrestore.orchestration.stage2"),
    ]
    assert "rlrestore.data.shards:2 imports rewards.base: the core may not import a role" == str(core[0])
    assert wrong_arrows("rlrestore.orchestration.bench", source) == []
    # Relative imports resolve against the importing package.
    relative = wrong_arrows("rlrestore.models", "from ..orchestration import cli\n", is_package=True)
    assert [a.imported for a in relative] == ["rlrestore.orchestration.cli"]
    assert [a.imported for a in wrong_arrows("rlrestore.models.lora", "from . import loading\n")] == []
