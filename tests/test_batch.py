"""`python -m runtime batch` (runtime/batch.py): Ray Data over an image collection on a local Ray instance with 2
workers; rows equal the pipeline's answers for each image alone; unreadable images become error rows; a killed
job, rerun, finishes with every image exactly once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from runtime.batch import BatchInputError, Job, list_images, read_output, run  # noqa: E402
from export.parity import probe_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATE = {"max_new_tokens": 8, "min_new_tokens": 4}  # (a random model may end its text at once otherwise)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, make_engine):
    """A folder of 9 images (one in a subfolder), one broken file, and the stage-2 engine with the Q-Former's
    text side."""
    _, engine = make_engine("stage2text")
    folder = tmp_path_factory.mktemp("collection")
    (folder / "more").mkdir()
    images = probe_images(32, count=9, seed=7)
    for i, im in enumerate(images):
        im.save(folder / ("more" if i == 8 else ".") / f"{i}.png")
    (folder / "more" / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    return engine, folder


def test_rows_equal_each_image_alone_and_bad_images_become_errors(local_ray, collection, tmp_path):
    from runtime import Blip2Pipeline

    engine, folder = collection
    out = tmp_path / "captions"
    result = run(Job(engines=str(engine), task="caption", input=str(folder), output=str(out), workers=2,
                     batch_size=3, options=GENERATE))
    rows = {r["path"]: r for r in read_output(out)}
    assert len(rows) == 10 and result["written"] == 10 and result["errors"] == 1
    import pyarrow.parquet as pq  # one file per --batch-size rows (the last one the rest), as the README says

    assert sorted(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == [1, 3, 3, 3]
    pipe = Blip2Pipeline.from_dir(engine)
    for path, row in rows.items():
        if path.endswith("broken.png"):
            assert row["caption"] is None and "not an image" in row["error"]
            continue
        assert row["error"] is None
        assert row["caption"] and row["caption"] == pipe.caption(path, **GENERATE)[0]  # batched == alone here
    # embed: the ITC features of each image, [queries][dim]
    run(Job(engines=str(engine), task="embed", input=str(folder), output=str(tmp_path / "feats"), workers=2,
            batch_size=4))
    feats = {r["path"]: r["features"] for r in read_output(tmp_path / "feats") if r["error"] is None}
    path = sorted(feats)[0]
    np.testing.assert_allclose(np.array(feats[path]), pipe.embed_images(path)[0], atol=1e-5)


def _six_copies(folder: Path, dest: Path) -> Path:
    """60 images: the collection's 10 files six times over (one broken each time)."""
    dest.mkdir()
    for i in range(6):
        for src in list_images(str(folder)):
            (dest / f"{i}-{Path(src).name}").write_bytes(Path(src).read_bytes())
    return dest


def _one_by_one(engine, source, out) -> list[str]:
    """The command line of a caption job that writes one part per image (so that a stop lands part-way)."""
    return [sys.executable, "-m", "runtime", "batch", "--engines", str(engine), "--task", "caption", "--input",
            str(source), "--output", str(out), "--workers", "1", "--batch-size", "1", "--max-new-tokens", "8",
            "--min-new-tokens", "4"]


def test_a_killed_job_rerun_finishes_every_image_once(local_ray, collection, tmp_path):
    engine, folder = collection
    # 60 images, written one part per image: the kill below lands part-way (with the collection's 10, Ray Data
    # ran the actor ahead and the driver wrote every part before the kill on a loaded machine)
    images = _six_copies(folder, tmp_path / "images")
    listing = tmp_path / "list.txt"
    paths = list_images(str(images))
    listing.write_text("\n".join(paths * 3) + "\n")  # (a path listed twice is done once)
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"{p}" for p in paths) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(_one_by_one(engine, many, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("part-*.parquet")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    proc.wait()
    before = len(read_output(out))
    assert 0 < before < len(paths), "the job should have been killed part-way"
    (out / ".part-cut-short.parquet").write_bytes(b"PAR1 half")  # a temporary file left by the kill
    result = run(Job(engines=str(engine), task="caption", input=str(listing), output=str(out), workers=2,
                     batch_size=3, options=GENERATE))
    rows = read_output(out)
    assert sorted(r["path"] for r in rows) == sorted(paths)  # every image once: none lost, none twice
    assert result["skipped"] == before and result["written"] == len(paths) - before
    assert not list(out.glob(".part-*"))
    again = run(Job(engines=str(engine), task="caption", input=str(listing), output=str(out), options=GENERATE))
    assert again["written"] == 0 and len(read_output(out)) == len(paths)


def test_bad_jobs_are_refused_before_ray_starts(collection, tmp_path):
    engine, folder = collection
    job = dict(engines=str(engine), input=str(folder), output=str(tmp_path / "o"))
    with pytest.raises(BatchInputError, match="--task ask needs a non-empty --prompt"):
        run(Job(task="ask", **job))
    with pytest.raises(BatchInputError, match="--prompt is for --task ask"):
        run(Job(task="caption", prompt="Question: why?", **job))
    with pytest.raises(BatchInputError, match="holds no image files"):
        run(Job(task="caption", **{**job, "input": str(tmp_path)}))
    (tmp_path / "rows.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(BatchInputError, match="line 1 is not a JSON object with a 'path' key"):
        run(Job(task="caption", **{**job, "input": str(tmp_path / "rows.jsonl")}))
    (tmp_path / "rows.csv").write_text("path\na.png\n")
    with pytest.raises(BatchInputError, match="unknown kind of list '.csv'"):
        run(Job(task="caption", **{**job, "input": str(tmp_path / "rows.csv")}))
    assert not (tmp_path / "o").exists()  # nothing written for a refused job
    out = subprocess.run([sys.executable, "-m", "runtime", "batch", "--engines", str(engine), "--task", "ask",
                          "--input", str(folder), "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip() == "error: --task ask needs a non-empty --prompt"


def test_inputs_from_text_parquet_and_jsonl_lists(collection, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, folder = collection
    paths = list_images(str(folder))
    assert len(paths) == 10 and all(Path(p).suffix == ".png" for p in paths)
    (tmp_path / "imgs").symlink_to(folder)
    relative = [str(Path("imgs") / Path(p).relative_to(folder)) for p in paths]
    (tmp_path / "l.txt").write_text("\n".join(relative) + "\n\n")
    pq.write_table(pa.table({"file": relative}), tmp_path / "l.parquet")
    (tmp_path / "l.jsonl").write_text("".join(f'{{"path": "{p}"}}\n' for p in relative))
    want = [str(tmp_path / p) for p in relative]  # relative to the list's folder
    assert list_images(str(tmp_path / "l.txt")) == want
    assert list_images(str(tmp_path / "l.parquet"), column="file") == want
    assert list_images(str(tmp_path / "l.jsonl")) == want
    with pytest.raises(BatchInputError, match="has no column 'path' \\(it has: file\\)"):
        list_images(str(tmp_path / "l.parquet"))


def test_ctrl_c_keeps_what_is_written_in_one_line(local_ray, collection, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) part-way through a job: exit 130, the
    progress line ends and one line says how to finish, no traceback; the parts written are whole, and the rerun
    finishes the rest."""
    engine, folder = collection
    images = _six_copies(folder, tmp_path / "images")
    out = tmp_path / "out"
    proc = subprocess.Popen(_one_by_one(engine, images, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("part-*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.replace("\r", "\n").splitlines()
    assert proc.returncode == 130, err
    assert lines[-1] == f"interrupted; rerun the same command to finish (what is in {out} is kept)", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    done = len(read_output(out))
    assert 0 < done < len(list_images(str(images)))
    result = run(Job(engines=str(engine), task="caption", input=str(images), output=str(out), workers=1,
                     options=GENERATE))
    assert result["skipped"] == done and len(read_output(out)) == len(list_images(str(images)))


def test_progress_in_a_log_is_a_line_every_10_s_not_carriage_returns(capsys, monkeypatch):
    from runtime import batch

    clock = iter([1.0, 2.0, 11.0, 12.0])
    monkeypatch.setattr(batch.time, "perf_counter", lambda: next(clock))
    progress = batch.Progress(total=4, started=0.0)  # (stderr is captured here: not a terminal)
    for done in (1, 2, 3, 4):
        progress.show(done)
    progress.end()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == ["3/4 images, 0.3 images/s", "4/4 images, 0.3 images/s"]


def test_the_output_folder_is_the_jobs_and_nothing_else_is_touched(local_ray, collection, tmp_path):
    """job.json records the settings: a rerun with others is refused, as are a folder of files the job did not write
    and a folder another running job holds; nothing the job did not write is deleted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    engine, folder = collection
    job = dict(engines=str(engine), input=str(folder), workers=1, batch_size=5, options=GENERATE)
    foreign = tmp_path / "dataset"
    foreign.mkdir()
    pq.write_table(pa.table({"id": [1, 2]}), foreign / "part-0001.parquet")  # another tool's dataset
    (foreign / ".part-tmp.parquet").write_bytes(b"another job's temporary")
    before = sorted((p.name, p.read_bytes()) for p in foreign.iterdir())
    with pytest.raises(BatchInputError, match="holds files this job did not write"):
        run(Job(task="caption", output=str(foreign), **job))
    assert sorted((p.name, p.read_bytes()) for p in foreign.iterdir()) == before  # (its files were deleted before)
    out = tmp_path / "out"
    run(Job(task="caption", output=str(out), **job))
    with pytest.raises(BatchInputError, match=r"other settings \(prompt, task differ\)"):
        run(Job(task="ask", prompt="Question: what? Answer:", output=str(out), **job))
    with pytest.raises(BatchInputError, match=r"other settings \(options differ\)"):
        run(Job(task="caption", output=str(out), **{**job, "options": {"max_new_tokens": 5}}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))  # another job, running
        with pytest.raises(BatchInputError, match=f"being written by another job \\(process {sleeper.pid}\\)"):
            run(Job(task="caption", output=str(out), **job))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run(Job(task="caption", output=str(out), **job))["written"] == 0  # (a stale lock)
    assert len(read_output(out)) == 10 and not (out / ".lock").exists()


def test_one_file_under_two_spellings_is_one_row_and_error_rows_can_be_retried(local_ray, collection, tmp_path):
    """Resume keys on the real path (a symlinked folder and the folder are one set of files); a FIFO in a list is an
    error row, not a hang; --retry-errors does the error rows again once the file is there."""
    engine, folder = collection
    (tmp_path / "link").symlink_to(folder)
    listing = tmp_path / "list.txt"
    paths = list_images(str(folder))
    missing = tmp_path / "late.png"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    listing.write_text("\n".join(paths + [str(tmp_path / "link" / Path(p).relative_to(folder)) for p in paths]
                                 + [str(missing), str(fifo)]) + "\n")
    job = dict(engines=str(engine), task="caption", input=str(listing), output=str(tmp_path / "out"), workers=1,
               batch_size=4, options=GENERATE)
    result = run(Job(**job))
    rows = {r["path"]: r for r in read_output(tmp_path / "out")}
    assert len(rows) == 12 and result["errors"] == 3  # 10 files once, the missing one, the FIFO; broken.png
    assert "not a regular file" in rows[str(fifo)]["error"] and "no such file" in rows[str(missing)]["error"]
    probe_images(32, count=1, seed=5)[0].save(missing)
    assert run(Job(**job))["written"] == 0  # (errors are kept unless asked)
    again = run(Job(**job, retry_errors=True))
    rows = {r["path"]: r for r in read_output(tmp_path / "out")}
    assert again["written"] == 3 and len(rows) == 12 and len(read_output(tmp_path / "out")) == 12
    assert rows[str(missing)]["error"] is None and rows[str(missing)]["caption"]


def test_any_failure_of_one_image_is_its_error_row():
    """A pipeline error other than a bad image (here a RuntimeError for one image) fails that image's row only."""
    import pyarrow as pa

    from runtime.batch import Worker

    class Pipe:
        def generate(self, images, prompt=None, **options):
            if any(im.size == (7, 7) for im in images):
                raise RuntimeError("graph failed")
            return [f"{im.size[0]}" for im in images]

    worker = Worker.__new__(Worker)
    worker.pipe, worker.task, worker.prompt, worker.options = Pipe(), "caption", None, {}
    from PIL import Image

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"blip2-worker-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    for size in (5, 7, 9):
        Image.new("RGB", (size, size)).save(tmp / f"{size}.png")
    out = worker(pa.table({"path": [str(tmp / f"{s}.png") for s in (5, 7, 9)]})).to_pylist()
    assert [r["caption"] for r in out] == ["5", None, "9"]
    assert out[1]["error"] == "RuntimeError: graph failed" and out[0]["error"] is None
