"""Offline inference over an image collection with Ray Data: a caption, an answer or the ITC features of every
image, written as a Parquet dataset; resumable (`pip install ".[scale]"`).

    python -m runtime batch --engines engines/demo/onnx --task caption --input photos/ --output captions/
    python -m runtime batch --engines E --task ask --prompt "Question: what is shown? Answer:" --input list.txt ...
    python -m runtime batch --engines E --task embed --input images.parquet --output feats/ --workers 4

Ray Data runs `Blip2Pipeline` in a pool of `--workers` actors (each loads the engine folder once, locally or on
the cluster at `--ray-address`) over batches of image paths; the driver writes each finished batch as one
Parquet file (`part-*.parquet`, written under a temporary name and renamed, so a file is whole or absent). A
rerun of the same command reads the paths already written and does only the rest: after a kill, no row is
lost or written twice (a file cut short by the kill is unreadable, removed, and its images done again). An
image that cannot be read becomes a row with `error` set, and the job goes on; the count is printed at the end.

Rows: `path` (as listed), then `caption` (caption), `answer` (ask) or `features` (embed: the image's ITC query
features, [num_queries][dim] float32 unit vectors), and `error` (null when the image was done).
"""
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runtime.actors import check_cluster_gpus, gpus_per_actor
from runtime.errors import Blip2EdgeError, ImageInputError

TASKS = {"caption": "caption", "ask": "answer", "embed": "features"}  # task -> its result column
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class BatchInputError(Blip2EdgeError, ValueError):
    """The batch job's input list, output folder or options cannot be used."""


@dataclass
class Job:
    engines: str
    task: str
    input: str
    output: str
    prompt: str | None = None
    workers: int = 1
    batch_size: int = 8
    ray_address: str | None = None
    column: str = "path"
    backend: str = "auto"
    options: dict = field(default_factory=dict)  # generation options, as Blip2Pipeline.generate takes them
    gpus: float | None = None  # per worker; None: 1 for a TensorRT engine folder, else 0 (runtime.actors)


# ------------------------------------------------------------------ inputs and what is done already
def list_images(source: str, column: str = "path") -> list[str]:
    """Image paths from a folder (recursive, by suffix), a text file (one path per line, relative to the file's
    folder), or a Parquet / JSONL file with a column of paths (`column`)."""
    path = Path(source)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return _non_empty(found, f"the folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not path.is_file():
        raise BatchInputError(f"--input {path} does not exist; give a folder of images, a .txt file of paths, or a "
                              f".parquet / .jsonl file with a '{column}' column")
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return _non_empty([str(_relative_to(path, line)) for line in lines], f"{path} lists no paths")
    if path.suffix in (".parquet", ".jsonl"):
        rows = _read_column(path, column)
        return _non_empty([str(_relative_to(path, p)) for p in rows], f"{path} has no rows")
    raise BatchInputError(f"--input {path}: unknown kind of list '{path.suffix}'; give a folder, a .txt file of "
                          f"paths, or a .parquet / .jsonl file with a '{column}' column")


def _read_column(path: Path, column: str) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if column not in names:
            raise BatchInputError(f"{path} has no column '{column}' (it has: {', '.join(names)}); name the column "
                                  f"of image paths with --column")
        return [str(p) for p in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(str(json.loads(line)[column]))
        except (ValueError, KeyError, TypeError):
            raise BatchInputError(f"{path} line {i} is not a JSON object with a '{column}' key; name the column "
                                  f"of image paths with --column") from None
    return rows


def _relative_to(listing: Path, entry: str) -> Path:
    p = Path(entry)
    return p if p.is_absolute() else listing.parent / p


def _non_empty(paths: list[str], message: str) -> list[str]:
    if not paths:
        raise BatchInputError(message)
    return paths


def written_paths(output: Path) -> set[str]:
    """The paths already in `output`'s Parquet parts. A part that cannot be read (cut short by a kill; the
    rename makes that unlikely) is removed: its images are done again."""
    import pyarrow.parquet as pq

    done = set()
    for part in sorted(output.glob("part-*.parquet")):
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except Exception:  # noqa: BLE001 (whatever pyarrow raises for a broken file: the part is redone)
            part.unlink()
    for tmp in output.glob(".part-*"):
        tmp.unlink()
    return done


# ------------------------------------------------------------------ the work of one actor
class Worker:
    """One per Ray actor: opens the engine folder once, then turns batches of paths into result rows."""

    def __init__(self, engines: str, task: str, prompt: str | None, options: dict, threads: int, backend: str):
        from runtime import Blip2Pipeline

        self.pipe = Blip2Pipeline.from_dir(engines, backend=backend, threads=threads)
        self.task, self.prompt, self.options = task, prompt, options

    def __call__(self, batch):
        import pyarrow as pa

        from runtime.image import load_image

        paths = batch.column("path").to_pylist()
        images, errors = [], [None] * len(paths)
        for i, p in enumerate(paths):
            try:
                images.append(load_image(p))
            except ImageInputError as e:
                errors[i] = str(e)
        results = iter(self._run(images) if images else [])
        values = [None if e else next(results) for e in errors]
        column = pa.array(values, type=pa.list_(pa.list_(pa.float32()))) if self.task == "embed" else \
            pa.array(values, type=pa.string())
        return pa.table({"path": paths, TASKS[self.task]: column, "error": pa.array(errors, type=pa.string())})

    def _run(self, images) -> list:
        if self.task == "embed":
            return [f.tolist() for f in self.pipe.embed_images(images)]
        return self.pipe.generate(images, prompt=self.prompt, **self.options)


# ------------------------------------------------------------------ the job
def check_job(job: Job) -> tuple[list[str], float]:
    """Everything that can be checked before Ray starts: the engine folder has what the task needs, the options
    fit the task, the input lists images. Returns the image paths and the GPUs each worker asks for."""
    from runtime.manifest import load_manifest

    if job.task not in TASKS:
        raise BatchInputError(f"--task {job.task!r} is not one of {', '.join(TASKS)}")
    if (job.task == "ask") != bool(job.prompt and job.prompt.strip()):
        raise BatchInputError("--task ask needs a non-empty --prompt" if job.task == "ask" else
                              f"--prompt is for --task ask, not {job.task}")
    if job.workers < 1 or job.batch_size < 1:
        raise BatchInputError("--workers and --batch-size must be at least 1")
    manifest = load_manifest(job.engines)
    needs = "qformer_text" if job.task == "embed" else "llm_decoder"
    if needs not in manifest.graphs and not (job.task != "embed" and job.options.get("decoder") == "qformer"):
        raise BatchInputError(f"--task {job.task} needs the '{needs}' graph, which {job.engines} does not have (it "
                              f"has: {', '.join(manifest.graphs)})")
    if Path(job.output).exists() and not Path(job.output).is_dir():
        raise BatchInputError(f"--output {job.output} is a file; give a folder for the Parquet dataset")
    return list_images(job.input, job.column), gpus_per_actor(manifest, job.gpus)


def run(job: Job, say=print) -> dict:
    """Run `job` to the end (or continue it); returns {"written", "skipped", "errors", "seconds"}."""
    listed, gpus = check_job(job)
    paths = list(dict.fromkeys(listed))  # (a path listed twice is done once)
    output = Path(job.output)
    done = written_paths(output) if output.is_dir() else set()
    todo = [p for p in paths if p not in done]
    say(f"{len(paths)} images listed, {len(paths) - len(todo)} already in {output}, {len(todo)} to do")
    if not todo:
        return {"written": 0, "skipped": len(paths), "errors": _count_errors(output), "seconds": 0.0}
    import ray

    started = time.perf_counter()
    _start_ray(job.ray_address)
    check_cluster_gpus(gpus, job.workers, "worker", job.ray_address)
    output.mkdir(parents=True, exist_ok=True)
    # a block per batch (up to 32 per worker), and at least one per worker: fewer images than workers x batch
    # size still reach every worker (and Ray does not warn that its actor pool cannot be used)
    blocks = max(min(len(todo), job.workers), min(len(todo) // job.batch_size, 4 * job.workers * 8))
    dataset = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
    threads = max(1, (os.cpu_count() or 1) // job.workers) if job.ray_address is None else None
    results = dataset.map_batches(
        Worker, fn_constructor_args=(job.engines, job.task, job.prompt, job.options, threads, job.backend),
        batch_size=job.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=1, num_gpus=gpus)
    written, progress = 0, Progress(len(todo), started)
    try:  # (batches of --batch-size rows, whatever blocks Ray's actors returned them in: one file each)
        for batch in results.iter_batches(batch_size=job.batch_size, batch_format="pyarrow"):
            if batch.num_rows:
                _write_part(output, batch)
                written += batch.num_rows
                progress.show(written)
    finally:  # (ends the progress line, also when Ctrl-C stops the job: its message goes on a line of its own)
        progress.end()
    return {"written": written, "skipped": len(paths) - len(todo), "errors": _count_errors(output),
            "seconds": time.perf_counter() - started}


class Progress:
    """The images/s line on stderr: rewritten in place on a terminal; where stderr is a file or a pipe (a log),
    a line every 10 s and at the end instead of one line of carriage returns."""

    def __init__(self, total: int, started: float, every_s: float = 10.0):
        self.total, self.started, self.every_s = total, started, every_s
        self.tty, self.shown, self.last = sys.stderr.isatty(), False, started

    def show(self, done: int) -> None:
        now = time.perf_counter()
        line = f"{done}/{self.total} images, {done / max(now - self.started, 1e-9):.1f} images/s"
        if self.tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
            self.shown = True
        elif now - self.last >= self.every_s or done == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last = now

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _start_ray(address: str | None) -> None:
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # its INFO lines would bury the job's progress line
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 configure_logging=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job prints its own images/s line
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # (not a warning that it is off)
    context.print_on_execution_start = False


def _write_part(output: Path, table) -> None:
    import pyarrow.parquet as pq

    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = output / f".{name}"
    pq.write_table(table, tmp)
    os.replace(tmp, output / name)


def _count_errors(output: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(int(pc.sum(pc.is_valid(pq.read_table(p, columns=["error"]).column("error"))).as_py() or 0)
               for p in output.glob("part-*.parquet"))


def read_output(output) -> list[dict]:
    """Every row of a batch job's output folder (for checking a small job: large outputs are for Ray Data,
    pandas or DuckDB to read)."""
    import pyarrow.parquet as pq

    return [row for part in sorted(Path(output).glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]
