"""The docs describe the tree as it is: docs/architecture.md's table names every module once, the figures are
what the result files say, and the README's runnable commands run as written."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_modules() -> list[str]:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where each concept lives"):doc.index("## The graphs")]
    return re.findall(r"`((?:train|export|runtime)/[\w/]+\.py)`", table)


def test_every_module_is_in_the_architecture_table_once():
    modules = sorted(str(p.relative_to(ROOT)) for pkg in ("train", "export", "runtime")
                     for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")
    named = _table_modules()
    assert not [m for m in modules if m not in named], "add a row for these modules"
    assert not sorted({m for m in named if named.count(m) > 1}), "name each module once"
    assert not [m for m in named if m not in modules], "these modules no longer exist"


def test_the_generated_figures_are_up_to_date():
    """docs/benchmarks.md and the README's table are what `python bench/report.py` writes from bench/results."""
    proc = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_report_decides_met_and_missed_from_the_value():
    sys.path.insert(0, str(ROOT / "bench"))
    from report import status

    assert status({"value": 1.62, "op": ">=", "bound": 1.5}) == "met"
    assert status({"value": 1.31, "op": ">=", "bound": 3.0}) == "**missed**"
    assert status({"value": 0.48, "op": "<=", "bound": 0.5}) == "met"
    assert status({"value": 1.57, "op": "<=", "bound": 1.5}) == "**missed**"
    assert status({"value": 0.9, "op": None, "bound": None}) == ""


def _runnable_blocks(text: str) -> dict[str, str]:
    """The fenced shell blocks after a `<!-- runnable: NAME -->` line, with continuation lines joined."""
    return {m.group(1): m.group(2).replace("\\\n", " ")
            for m in re.finditer(r"<!-- runnable: ([\w ]+) -->\n```bash\n(.*?)```", text, re.S)}


def test_readme_has_its_runnable_blocks_and_every_line_fits():
    readme = (ROOT / "README.md").read_text()
    assert set(_runnable_blocks(readme)) == {"quick start", "demo tasks"}
    assert len(readme.splitlines()) <= 250
    assert not [n for n, line in enumerate(readme.splitlines(), 1) if len(line) > 120]


def test_the_readme_demo_tasks_run_as_written_and_print_what_it_shows(tmp_path):
    """The demo tasks' commands, run as written from a copy of the repository's examples against the demo model's
    engine folder (built here through the gate), print what the README shows below them."""
    readme = (ROOT / "README.md").read_text()
    commands = [c for c in _runnable_blocks(readme)["demo tasks"].splitlines() if c.strip()]
    shown = readme.split("<!-- runnable: demo tasks -->", 1)[1].split("```\n", 3)[2].split("```")[0]
    engines = _demo_engine(tmp_path)
    got = []
    for command in commands:
        command = command.replace("engines/demo/onnx", str(engines)).replace("python -m", f"{sys.executable} -m")
        proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr)
        got.append(proc.stdout)
    assert "".join(got) == shown


def _demo_engine(tmp_path) -> Path:
    """engines/demo/onnx where a user ran the quick start; else built here from models/demo."""
    built = ROOT / "engines" / "demo" / "onnx"
    if (built / "manifest.json").is_file():
        return built
    from export.build import build

    return build(ROOT / "models" / "demo", "onnx", tmp_path / "engines")


def test_the_runtime_page_python_example_runs_as_written(tmp_path):
    """docs/runtime.md's first Python block, run from a folder holding the examples and the demo model's engine
    folder where the page expects them (it writes a gallery/ folder there)."""
    page = (ROOT / "docs" / "runtime.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    work = tmp_path / "work"
    (work / "engines" / "demo").mkdir(parents=True)
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "engines" / "demo" / "onnx").symlink_to(_demo_engine(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "gallery").is_dir()
