"""The package's structure: no import cycle between lipdp modules (lazy imports inside functions included)."""

import ast
import os

import lipdp

PACKAGE = os.path.dirname(lipdp.__file__)


def module_names():
    names = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, file), os.path.dirname(PACKAGE))[:-3]
                name = relative.replace(os.sep, ".").removesuffix(".__init__")
                names[name] = os.path.join(folder, file)
    return names


def imports(path, known):
    """Every lipdp module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {name for name in found if name in known}


def find_cycle(graph):
    """A list of modules forming a cycle, or ``None``."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target, stack + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_lipdp_modules():
    known = module_names()
    graph = {name: imports(path, known) - {name, "lipdp"} for name, path in known.items() if name != "lipdp"}
    assert {"lipdp.model", "lipdp.mechanisms", "lipdp.runs", "lipdp.clipping.rules"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_MODULE_LINES = 480


def test_no_module_holds_several_rooms():
    """A module over ~450 lines holds several concepts: split it (one module per concept)."""
    sizes = {name: sum(1 for _ in open(path)) for name, path in module_names().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
