"""What the benchmarks share: the machine they ran on, peak memory, and their figures written as JSON that
`python bench/report.py` turns into docs/benchmarks.md and the README's table (so no figure is copied by hand).

    from common import Headline, write_results
    write_results("bench/results/serve.json", "serve", figures,
                  [Headline("continuous / requests: requests/s", ratio, "x", ">=", 1.5)])

A result file holds the command that produced it (as typed), the date, the machine, every figure the benchmark
printed (`figures`, free-form) and the headline figures, each with the target it is held against; the report
decides met or missed from the value and the target, not from anything the benchmark wrote about itself.
"""
import datetime
import json
import os
import platform
import resource
import shlex
import sys
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


def peak_rss_bytes(children: bool = False) -> int:
    """This process's (or its waited-for children's) peak resident set, from the kernel's ru_maxrss."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss * 1024


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
