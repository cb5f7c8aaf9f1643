"""What the benchmarks share: the machine they ran on, peak memory, and their figures written as JSON that
`python bench/report.py` turns into docs/benchmarks.md and the README's table (so no figure is copied by hand).

    from bench.common import Headline, write_results
    write_results("bench/results/serve.json", "serve", figures,
                  [Headline("continuous / requests: requests/s", ratio, "x", ">=", 1.5)])

A result file holds the command that produced it (as typed), the date, the machine, every figure the benchmark
printed (`figures`, free-form) and the headline figures, each with the target it is held against; the report
decides met or missed from the value and the target, not from anything the benchmark wrote about itself.

Also here: timing (`timed`, `median_seconds`, `interleaved_medians`), memory read from /proc (`proc_bytes`), and the
checkpoint and engine folders a benchmark needs, made only where absent (`checkpoint_folder`, `engine_folder`).
This module imports neither torch nor the exporter at the top (light processes, such as the serve benchmarks' and
the runtime-only probes, import it): the two folder helpers import them when they have something to make.
"""
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Headline:
    figure: str  # what it measures, as the docs name it
    value: float
    unit: str = ""
    op: str | None = None  # the target: value `op` bound ("<=" or ">="); None: no target (shown for context)
    bound: float | None = None
    note: str = ""  # e.g. the physical limit measured beside it


def machine() -> dict:
    """The machine a figure comes from (CPU model, cores, memory): figures from two machines are not compared."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "python": platform.python_version(), "system": platform.system()}


def held_target(op: str, bound: float | None, held: bool = True) -> tuple[str | None, float | None]:
    """A Headline's (op, bound): the target where it is held, (None, None) where the figure is shown for context
    (e.g. `--no-targets`: another configuration than the one the docs hold the target on)."""
    return (op, bound) if held else (None, None)


def proc_bytes(pid: int | str = "self", key: str = "VmHWM", file: str = "status") -> int:
    """A size the kernel gives in kB in /proc/PID/FILE, in bytes (0 where the process or the line is gone):
    status's VmHWM, a process's own peak resident set (ru_maxrss of a forked child would carry its parent's
    peak over), VmRSS its resident set now; smaps_rollup's Pss, its proportional set size."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="utf-8") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), 0)
    except (OSError, ValueError):
        return 0


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call of fn(*args, **kwargs)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def median_seconds(fn, rounds: int) -> float:
    """The median time of `rounds` calls of fn(), one after the other."""
    return statistics.median(timed(fn)[0] for _ in range(rounds))


def interleaved_medians(runs: dict, rounds: int) -> dict:
    """{name: median seconds} of each of `runs` ({name: fn}), every round calling each once, back to back
    (interleaved, so drift in the machine's speed hits them all alike)."""
    times: dict = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def checkpoint_folder(path, preset: str, seed: int = 0, **options) -> Path:
    """The random checkpoint of `preset` at `path` (train.blip2.random_checkpoint, `options` passed on, e.g.
    stage=1), written only if the folder is absent."""
    path = Path(path)
    if not path.exists():
        from train.blip2.random_checkpoint import make_random_checkpoint

        make_random_checkpoint(path, preset, seed=seed, **options)
    return path


def engine_folder(model, target: str, out_root, name: str | None = None, **build_options) -> Path:
    """The engine folder `out_root/<name>/<target>` of checkpoint `model` (name: the model folder's name, as
    `python -m export.build` names it), built by export.build.build (export and parity gate; `build_options`
    passed on, e.g. max_batch=32) only if it holds no manifest.json; an existing folder is used as it is."""
    folder = Path(out_root) / (name or Path(model).resolve().name) / target
    if (folder / "manifest.json").is_file():
        return folder
    from export.build import build

    print(f"building {folder} (export + parity gate) ...", flush=True)
    return build(model, target, out_root, name=name, **build_options)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def write_results(path, benchmark: str, figures: dict, headline: list[Headline]) -> Path:
    """Write one run's figures to `path` (JSON), for bench/report.py."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "machine": machine(),
              "headline": [asdict(h) for h in headline], "figures": figures}
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return path
