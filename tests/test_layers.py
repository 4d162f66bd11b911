"""No module imports upward: the layers named in ``engine/__init__.py`` (and bridge < addon) hold for every import,
at module level and inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lower rank = lower layer. A module may import its own layer and those below it.
LAYERS = [
    ("bridge", 0),
    ("engine.lazy", 1),
    ("engine.io", 1),
    ("engine.world", 2),
    ("engine.models", 3),
    ("engine.pipelines", 4),
    ("engine.testing", 5),
    ("engine.generators", 6),
    ("engine.run", 7),
    ("engine.service", 8),
    ("addon", 9),  # runs in Blender: bridge only (checked below), never the engine
]
#: Each area's ``commands`` module is the command line's (cli.py gathers them): above every layer.
COMMANDS_RANK = 10


def rank(module: str) -> int | None:
    if module.endswith(".commands"):
        return COMMANDS_RANK
    best = None
    for prefix, value in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, value)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module inside the package) of every import in ``path``."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if target else a.name for a in node.names] if not node.module else [target]
            elif (node.module or "").startswith("keyframe_worlds."):
                targets = [node.module[len("keyframe_worlds."):]]
            else:
                continue
            found += [(node.lineno, t) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name[len("keyframe_worlds."):]) for a in node.names if a.name.startswith("keyframe_worlds.")]
    return found


def test_no_module_imports_upward():
    offences = []
    checked = 0
    for folder in ("bridge", "engine", "addon"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            own = rank(module_name(path))
            if own is None:
                continue
            for line, target in imports_of(path):
                target_rank = rank(target)
                checked += 1
                if target_rank is not None and target_rank > own:
                    offences.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
                if folder == "addon" and target.startswith("engine"):
                    offences.append(f"{path.relative_to(ROOT)}:{line} imports the engine into Blender: {target}")
    assert checked > 200
    assert offences == [], "\n".join(offences)


def test_the_layer_check_sees_an_upward_import():
    """The check itself: a world/ module importing the runner (at module level or in a function) is caught."""
    source = "import torch\nfrom . import render\n\ndef f():\n    from ..run.runner import run_job\n"
    lines = imports_in(source, "engine.world.probe")
    assert lines == [(2, "engine.world.render"), (5, "engine.run.runner")]
    assert rank(lines[1][1]) > rank("engine.world.probe") >= rank(lines[0][1])
    assert rank("engine.models.commands") > rank("engine.service.server")
