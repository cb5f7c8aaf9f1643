"""Dependencies point one way, and no module imports itself back through others:

    runtime                      nothing of ours (a Jetson has numpy, onnxruntime or tensorrt, tokenizers, pillow)
    train.blip2                  runtime (the model definition and its checkpoints: what export builds on)
    train.training               train.blip2, runtime (training on users' data)
    train.evaluation             train.blip2, train.training (its data sets), runtime
    train.shapescaps             all of train, runtime (the demo: its recipe trains and evaluates)
    train (its command line)     all of train, runtime
    export                       train.blip2, runtime; and one exception, EXCEPTIONS below

Read from the source (every `import`, also those inside functions), so a lazy import cannot hide a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "train")
TRAIN = {"train", "train.blip2", "train.training", "train.evaluation", "train.shapescaps"}
ALLOWED = {
    "runtime": {"runtime"},
    "train.blip2": {"train.blip2", "runtime"},
    "train.training": {"train.training", "train.blip2", "runtime"},
    "train.evaluation": {"train.evaluation", "train.training", "train.blip2", "runtime"},
    "train.shapescaps": TRAIN | {"runtime"},
    "train": TRAIN | {"runtime"},
    "export": {"export", "train.blip2", "runtime"},
}
# Imports past the rules, each with its reason.
EXCEPTIONS = {
    ("export.calibration", "train.shapescaps.synthetic"): "the default calibration images when no --calib-images "
                                                          "folder is given (the demo model's own data)",
}


def _layer(module: str) -> str:
    """The ALLOWED key of a module: its subpackage of train, or its top-level package."""
    parts = module.split(".")
    if parts[0] == "train" and len(parts) > 2 or (len(parts) == 2 and f"train.{parts[1]}" in TRAIN):
        return ".".join(parts[:2])
    return parts[0]


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
                   if _layer(d) not in ALLOWED[_layer(m)] and (m, d) not in EXCEPTIONS)
    assert not wrong, wrong


def test_every_train_module_is_in_a_subpackage_and_the_rules_bite():
    """Nothing of train's lives beside its subpackages but the package and its command line; and a rule is a rule:
    export importing the demo's recipe would be refused."""
    loose = sorted(m for m in _graph() if m.startswith("train.") and _layer(m) not in TRAIN)
    assert not loose and _layer("train.__main__") == "train", loose
    assert _layer("train.shapescaps.recipe") not in ALLOWED[_layer("export.build")]
    assert _layer("train.blip2.model") in ALLOWED[_layer("export.build")]


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
    source.write_text("def f():\n    from export.build import build\n    import train.blip2.model\n")
    assert _imports(source, {"export.build", "train.blip2.model"}) == {"export.build", "train.blip2.model"}
