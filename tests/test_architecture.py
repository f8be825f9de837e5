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


def returned_sequences(function: ast.FunctionDef | ast.Lambda) -> list[int]:
    """Lines where ``function`` itself (not a function inside it) returns a tuple or list written out in place."""
    if isinstance(function, ast.Lambda):
        return [function.lineno] if isinstance(function.body, ast.Tuple | ast.List) else []
    found, todo = [], list(function.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple | ast.List):
            found.append(node.lineno)
        todo.extend(ast.iter_child_nodes(node))
    return found


def handler_source(handler: object) -> ast.FunctionDef | ast.Lambda:
    """The syntax tree of an event handler, through its decorators."""
    import inspect
    import textwrap

    code = inspect.unwrap(handler)
    tree = ast.parse(textwrap.dedent(inspect.getsource(code)).strip().removesuffix(","), mode="exec")
    kinds = ast.Lambda if code.__name__ == "<lambda>" else ast.FunctionDef
    return next(node for node in ast.walk(tree) if isinstance(node, kinds)
                and (kinds is ast.Lambda or node.name == code.__name__))


def test_the_ui_is_wired_by_name(tmp_path):
    """A handler that updates several widgets says which one gets each value (``{component: value}``); none hands
    back a list that must line up with its outputs, and no code counts positions in a list of widgets."""
    from lora_gradio.studio import Studio
    from lora_gradio.ui import build_app
    from lora_gradio.workspace import Workspace

    app = build_app(Studio(Workspace.open(tmp_path / "ws")))
    wired = [fn for fn in app.fns.values() if fn.fn is not None and len(fn.outputs) > 1]
    assert len(wired) > 20  # the walk sees the tabs' events
    positional = {}
    for fn in wired:
        tree = handler_source(fn.fn)
        if lines := returned_sequences(tree):
            positional[f"{fn.fn.__module__}.{fn.fn.__qualname__}"] = lines
    assert positional == {}
    for path in (PACKAGE / "ui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            assert not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)
                        and isinstance(node.left, ast.List)), f"{path.name}:{node.lineno}: a list of skips by count"
            assert not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "index"), f"{path.name}:{node.lineno}: a widget found by position"


def test_the_wiring_check_sees_positional_handlers():
    def positional(a, b):
        def inner():
            return [a, b]  # a helper's list is its own business
        return a, inner()

    def named(a):
        return {a: 1}

    assert returned_sequences(handler_source(positional)) == [4]  # lines of its own source
    assert returned_sequences(handler_source(named)) == []
    assert returned_sequences(handler_source(lambda: (1, 2))) != []
