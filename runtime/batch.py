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

The output folder is the job's: `job.json` records the engine folder, its manifest's hash, the task, the prompt and
the options, and a rerun with other settings is refused, as is an output folder holding files the job did not
write, or one another running job holds (`.lock`). The job deletes nothing it did not write. Resuming keys on each
image's real path (a relative, absolute or symlinked spelling of one file is one image); `--retry-errors` does the
error rows again. Any failure of one image (unreadable, a FIFO or a device in a list, a pipeline error) is that
image's error row; the job itself fails only when its folders or its engine cannot be used.
"""
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runtime.actors import check_cluster_gpus, gpus_per_actor
from runtime.errors import Blip2EdgeError
from runtime.processes import alive

logger = logging.getLogger(__name__)

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
    providers: list | None = None  # ONNX Runtime's execution providers (Blip2Pipeline.from_dir)
    options: dict = field(default_factory=dict)  # generation options, as Blip2Pipeline.generate takes them
    gpus: float | None = None  # per worker; None: 1 for a TensorRT engine folder, else 0 (runtime.actors)
    retry_errors: bool = False  # do the rows with an error again

    def record(self) -> dict:
        """What makes two runs the same job (job.json): a rerun must match it to add to the output."""
        import hashlib

        from runtime.search import GenerationConfig

        manifest = Path(self.engines) / "manifest.json"
        defaults = {f.name: f.default for f in GenerationConfig.__dataclass_fields__.values()}
        options = {k: v for k, v in sorted(self.options.items())  # (as given: an option at its default is none)
                   if v is not None and not (k in defaults and k != "max_new_tokens" and defaults[k] == v)}
        return {"format": 1, "engines": os.path.realpath(self.engines),
                "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(), "task": self.task,
                "prompt": self.prompt, "options": options}


JOB_FILE, LOCK_FILE = "job.json", ".lock"
STOP = threading.Event()  # set by the CLI's Ctrl-C handler: the job stops after the batch it is writing


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


def written_paths(output: Path, retry_errors: bool = False) -> set[str]:
    """The real paths of the images already in `output`'s Parquet parts (the job's folder: job.json says so). A part
    that cannot be read (cut short by a kill; the rename makes that unlikely) is removed: its images are done again,
    and so are the temporaries of a killed run. With `retry_errors`, the error rows are taken out of their parts (each
    rewritten under a temporary name, then renamed) and not counted as done."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    done = set()
    for part in sorted(output.glob("part-*.parquet")):
        try:
            table = pq.read_table(part)
            paths = table.column("path").to_pylist()
        except Exception:  # noqa: BLE001 (whatever pyarrow raises for a broken file: the part is redone)
            part.unlink()
            continue
        if retry_errors and table.column("error").null_count < table.num_rows:
            table = table.filter(pc.is_null(table.column("error")))
            if table.num_rows:
                _write_part(output, table, name=part.name)
            else:
                part.unlink()
            paths = table.column("path").to_pylist()
        done.update(os.path.realpath(p) for p in paths)
    for tmp in output.glob(".part-*.parquet"):
        tmp.unlink()
    return done


def claim_output(output: Path, job: Job) -> None:
    """Make `output` this job's, or refuse: a folder holding files the job did not write, a job.json of other
    settings, a .lock of a job still running. Takes the lock (released by release_output)."""
    record = job.record()
    if output.is_dir():
        mine = {JOB_FILE, LOCK_FILE}
        theirs = sorted(p.name for p in output.iterdir() if p.name not in mine
                        and not (p.name.startswith(("part-", ".part-")) and p.name.endswith(".parquet")))
        if theirs or (any(output.iterdir()) and not (output / JOB_FILE).is_file()):
            raise BatchInputError(f"--output {output} holds files this job did not write "
                                  f"({', '.join(theirs[:3]) or 'parts without a job.json'}); "
                                  f"give a new or empty folder")
        if (output / JOB_FILE).is_file():
            try:
                before = json.loads((output / JOB_FILE).read_text())
            except ValueError:
                before = {}
            changed = sorted(k for k in record if before.get(k) != record[k])
            if changed:
                raise BatchInputError(f"--output {output} holds a job with other settings ({', '.join(changed)} "
                                      f"differ); rerun it with its own settings (in {output / JOB_FILE}), or give "
                                      f"another --output")
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and alive(pid):
                raise BatchInputError(f"--output {output} is being written by another job (process {pid}); wait for "
                                      f"it to end, or give another --output") from None
            lock.unlink(missing_ok=True)  # (a job that was killed: its lock is stale)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    (output / JOB_FILE).write_text(json.dumps(record, indent=1))


def release_output(output: Path) -> None:
    lock = output / LOCK_FILE
    try:
        if int(lock.read_text() or 0) == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------ the work of one actor
class Worker:
    """One per Ray actor: opens the engine folder once, then turns batches of paths into result rows."""

    def __init__(self, engines: str, task: str, prompt: str | None, options: dict, threads: int, backend: str,
                 providers: list | None = None):
        from runtime import Blip2Pipeline

        self.pipe = Blip2Pipeline.from_dir(engines, backend=backend, threads=threads, providers=providers)
        self.task, self.prompt, self.options = task, prompt, options

    def __call__(self, batch):
        import pyarrow as pa

        from runtime.image import load_image

        paths = batch.column("path").to_pylist()
        images, errors = [], [None] * len(paths)
        for i, p in enumerate(paths):
            try:
                images.append(load_image(p))
            except Exception as e:  # noqa: BLE001 (any failure of one image is its error row)
                errors[i] = str(e) if isinstance(e, Blip2EdgeError) else f"{type(e).__name__}: {e}"
        try:
            results = iter(self._run(images) if images else [])
        except Exception:  # noqa: BLE001 (found per image: a failing image fails its own row only)
            results = iter(self._each(images))
        values = []
        for i in range(len(paths)):
            value = None if errors[i] else next(results)
            if isinstance(value, _Failed):
                errors[i], value = value.message, None
            values.append(value)
        column = pa.array(values, type=pa.list_(pa.list_(pa.float32()))) if self.task == "embed" else \
            pa.array(values, type=pa.string())
        return pa.table({"path": paths, TASKS[self.task]: column, "error": pa.array(errors, type=pa.string())})

    def _each(self, images) -> list:
        """The images one at a time: each one's result, or _Failed with its message."""
        out = []
        for image in images:
            try:
                out.append(self._run([image])[0])
            except Exception as e:  # noqa: BLE001
                out.append(_Failed(str(e) if isinstance(e, Blip2EdgeError) else f"{type(e).__name__}: {e}"))
        return out

    def _run(self, images) -> list:
        if self.task == "embed":
            return [f.tolist() for f in self.pipe.embed_images(images)]
        return self.pipe.generate(images, prompt=self.prompt, **self.options)


@dataclass
class _Failed:
    message: str


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
    return list_images(job.input, job.column), gpus_per_actor(manifest, job.gpus, job.providers)


def run(job: Job) -> dict:
    """Run `job` to the end (or continue it); returns {"written", "skipped", "errors", "seconds"}."""
    listed, gpus = check_job(job)
    output = Path(job.output)
    created = not output.exists()
    claim_output(output, job)
    try:
        return _run(job, listed, gpus, output)
    except BaseException:
        if created and not any(output.glob("part-*.parquet")):  # (refused before any row: nothing half-made)
            shutil.rmtree(output, ignore_errors=True)
        raise
    finally:
        release_output(output)


def _run(job: Job, listed: list[str], gpus: float, output: Path) -> dict:
    real = {}
    for p in listed:  # (one file listed twice, or under two spellings, is done once)
        real.setdefault(os.path.realpath(p), p)
    paths = list(real.values())
    done = written_paths(output, job.retry_errors)
    todo = [p for r, p in real.items() if r not in done]
    logger.info(f"{len(paths)} images listed, {len(paths) - len(todo)} already in {output}, {len(todo)} to do")
    if not todo:
        return {"written": 0, "skipped": len(paths), "errors": _count_errors(output), "seconds": 0.0}
    import ray

    started = time.perf_counter()
    _start_ray(job.ray_address)
    check_cluster_gpus(gpus, job.workers, "worker", job.ray_address)
    # a block per batch (up to 32 per worker), and at least one per worker: fewer images than workers x batch
    # size still reach every worker (and Ray does not warn that its actor pool cannot be used)
    blocks = max(min(len(todo), job.workers), min(len(todo) // job.batch_size, 4 * job.workers * 8))
    dataset = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
    threads = max(1, (os.cpu_count() or 1) // job.workers) if job.ray_address is None else None
    results = dataset.map_batches(
        Worker, fn_constructor_args=(job.engines, job.task, job.prompt, job.options, threads, job.backend,
                                     job.providers),
        batch_size=job.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=1, num_gpus=gpus)
    written, progress = 0, Progress(len(todo), started)
    try:  # (batches of --batch-size rows, whatever blocks Ray's actors returned them in: one file each)
        for batch in results.iter_batches(batch_size=job.batch_size, batch_format="pyarrow"):
            if STOP.is_set():
                raise KeyboardInterrupt
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


def _write_part(output: Path, table, name: str | None = None) -> None:
    import pyarrow.parquet as pq

    name = name or f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
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
