"""Dependencies point one way: `runtime/` depends on nothing of ours, `export/` on the model definition (`train/`)
and the runtime, `train/` never on `export/`; and no module imports itself back through others.

Read from the source (every `import`, also those inside functions), so a lazy import cannot hide a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "train")
ALLOWED = {"runtime": {"runtime"}, "train": {"train", "runtime"}, "export": {"export", "train", "runtime"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports (`from pkg import mod` counts as `pkg.mod` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name, name.split(".")[0]} for name, path in files.items()}


def test_packages_depend_one_way():
    wrong = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                   if d.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not wrong, wrong


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_checker_sees_a_lazy_import(tmp_path):
    """The reader above counts an import inside a function (what a lazy import looks like)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from export.build import build\n    import train.model\n")
    assert _imports(source, {"export.build", "train.model"}) == {"export.build", "train.model"}
