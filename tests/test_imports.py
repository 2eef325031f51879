"""The package's import graph has no circle: every module of facekernels/ can be read (and changed) knowing only
the modules below it. Static: the imports written in each file, at the top and inside functions alike (a deferred
import that closes a circle is still one, only hidden until it runs)."""

import ast
import pathlib

import facekernels

ROOT = pathlib.Path(facekernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("facekernels", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = ROOT) -> dict:
    """module -> the facekernels modules it imports (``from .x import y`` counts as x.y when y is a module)."""
    files = {_module_name(p): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join(base + ([node.module] if node.module else []))
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def circles(graph: dict) -> list:
    """The import circles: each a list of modules, the first imported again by the last."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):])
            return
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_imports_no_circle():
    graph = import_graph()
    assert len(graph) > 30 and "facekernels.benchmark.cli" in graph
    assert "facekernels._rowmath" in graph["facekernels._algorithm"]  # the graph sees relative imports
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in found)
