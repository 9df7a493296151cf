"""The README's Code map stays true: every file it names exists, every function or class it names
is defined in the file named in the same cell, and every config key it names is a key of the schema."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from rlrestore.config import describe_schema

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("seed", "device", "precision", "policy", "sampler", "degradation", "ray", "logging", "serve",
            "autoencoder", "stage1_1", "stage1_2", "stage2", "eval")  # fmt: skip


def code_map() -> str:
    """The text of the README's ``## Code map`` section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Code map")
    return text[start : text.index("\n## ", start + 1)]


def schema_keys() -> set[str]:
    """Every config key (``a.b.c``) and every section prefix (``a.b``)."""
    keys = {line.split(" ", 1)[0].rstrip(":") for line in describe_schema()}
    return keys | {".".join(key.split(".")[:n]) for key in keys for n in range(1, key.count(".") + 1)}


def defined_names(path: Path) -> set[str]:
    """Functions, classes and methods (``Class.method``) defined in ``path``."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
    return names


def test_code_map_names_real_files() -> None:
    paths = re.findall(r"`((?:rlrestore|rewards|rollouts|trainers|tests)/[\w/.]*)`", code_map())
    assert len(paths) > 20
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"the README's Code map names files that do not exist: {missing}"


def test_code_map_names_functions_where_they_are_defined() -> None:
    # The map's convention: `path/to/module.py` `function_or_Class.method`.
    pairs = re.findall(r"`((?:rlrestore|rewards|rollouts|trainers)/[\w/]+\.py)` `([A-Za-z_][\w.]*)`", code_map())
    assert len(pairs) > 10
    wrong = [(path, name) for path, name in pairs if name not in defined_names(ROOT / path)]
    assert not wrong, f"the README's Code map places names in files that do not define them: {wrong}"


def test_code_map_names_real_config_keys() -> None:
    keys = schema_keys()
    named = re.findall(rf"`((?:{'|'.join(SECTIONS)})(?:\.[a-z_0-9]+)*)(?:\.\*)?`", code_map())
    assert len(named) > 20
    unknown = sorted({key for key in named if key not in keys and not key.endswith(".py")})
    assert not unknown, f"the README's Code map names config keys the schema does not have: {unknown}"
