"""The layering the code promises, read from the source: no module of lora_gradio/ imports itself back through
others, whether at the top, inside a function or only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_gradio"


def module_name(path: Path) -> str:
    """lora_gradio/training/loop.py -> lora_gradio.training.loop; a package's __init__ is the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = ".".join(package[:len(package) - node.level + 1] + ([source] if source else []))
            for alias in node.names:  # "from . import api" imports the module lora_gradio.ui.api
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports that leads from ``start`` back to it, if there is one."""
    trail, seen = [start], set()

    def walk(node: str) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*trail, start]
            if nxt not in seen:
                seen.add(nxt)
                trail.append(nxt)
                if found := walk(nxt):
                    return found
                trail.pop()
        return None

    return walk(start)


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "lora_gradio.request" in graph["lora_gradio.comfyui"]  # a top-level relative import
    assert "lora_gradio.inference" in graph["lora_gradio.training.samples"]  # one inside a function
    assert "lora_gradio.ui.api" in graph["lora_gradio.ui"]  # "from . import api"
    assert graph["lora_gradio.request"] == {"lora_gradio.errors"}  # the leaf the others share
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]


def test_no_module_imports_itself_back():
    graph = import_graph()
    cycles = [" -> ".join(found) for name in sorted(graph) if (found := cycle_from(graph, name))]
    assert not cycles, "import circles:\n" + "\n".join(cycles)


# What the UI may import besides its own modules: the Studio (with the records and facts it re-exports), and the
# records the Studio takes or returns (job state, visitor, settings, generate request), the error it raises and the
# one folder the server serves files from.
UI_MAY_IMPORT = {"lora_gradio.studio", "lora_gradio.jobs", "lora_gradio.access", "lora_gradio.errors",
                 "lora_gradio.request", "lora_gradio.training.config", "lora_gradio.served"}
MAX_LINES = 450
LOOP_LINES = 400


def test_the_ui_reaches_the_backend_only_through_the_studio():
    graph = import_graph()
    crossing = {name: sorted(m for m in imports if not m.startswith("lora_gradio.ui") and m not in UI_MAY_IMPORT)
                for name, imports in graph.items() if name.startswith("lora_gradio.ui")}
    assert {name: found for name, found in crossing.items() if found} == {}
    assert "lora_gradio.studio" in graph["lora_gradio.ui.train_tab"]  # the walk sees the tabs' imports


def test_every_module_is_a_room_of_a_readable_size():
    lengths = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
    assert lengths["lora_gradio.training.loop"] < LOOP_LINES
    loop = ast.parse((PACKAGE / "training" / "loop.py").read_text(encoding="utf-8"))
    trainer = next(node for node in loop.body if isinstance(node, ast.ClassDef) and node.name == "Trainer")
    init = next(node for node in trainer.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    assert init.end_lineno - init.lineno < 50  # the set-up reads as a list of steps; each step is a function
