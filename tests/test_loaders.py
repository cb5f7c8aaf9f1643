"""Files a deployment reads that someone else may have written or edited: an engine folder's manifest and a saved
image gallery. Each wrong one is refused with the loader's own error naming the file, never an IndexError or a
KeyError at first use, and nothing outside the folder is ever opened."""
import json
import shutil
import threading

import numpy as np
import pytest

from runtime import index as index_module
from runtime.errors import EngineFolderError
from runtime.manifest import load_manifest
from runtime.retrieval import ImageGallery, RetrievalError


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("tiny")[1]


def _edited(engine, tmp_path, edit) -> str:
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["graphs"]["vision"].update(file="/etc/hostname"), "not inside the engine folder"),
    (lambda m: m["graphs"]["vision"].update(file="../vision.onnx"), "not inside the engine folder"),
    (lambda m: m["llm"].update(tokenizer="/etc/hostname"), "not inside the engine folder"),
    (lambda m: m["limits"].update(max_batch=0), "limits.max_batch is 0"),
    (lambda m: m["limits"].update(max_new_tokens=-5), "limits.max_new_tokens is -5"),
    (lambda m: m["llm"].update(eos_token_id=10**9), "outside the vocabulary"),
    (lambda m: m["llm"].update(num_layers=0), "llm.num_layers is 0"),
])
def test_a_manifest_naming_files_outside_its_folder_or_impossible_numbers_is_refused(engine, tmp_path, edit, words):
    folder = _edited(engine, tmp_path, edit)
    with pytest.raises(EngineFolderError, match=words):
        load_manifest(folder)


def test_a_link_out_of_the_folder_is_refused(engine, tmp_path):
    folder = _edited(engine, tmp_path, lambda m: None)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(folder / "vision.onnx", outside)
    (folder / "vision.onnx").symlink_to(outside)
    with pytest.raises(EngineFolderError, match="not inside the engine folder"):
        load_manifest(folder)


def _gallery(images=600, queries=4, width=16, seed=0) -> ImageGallery:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, width))
    feats = centers[rng.integers(0, 12, (images, queries))] + 0.1 * rng.standard_normal((images, queries, width))
    feats = (feats / np.linalg.norm(feats, axis=-1, keepdims=True)).astype(np.float32)
    return ImageGallery(feats, rng.standard_normal((images, 3, 8)).astype(np.float32))


def test_a_gallery_from_elsewhere_is_refused_naming_the_file(tmp_path, monkeypatch):
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(index_module, "APPROXIMATE_FROM", 1000)  # 600 x 4 vectors: a FAISS index is saved
    gallery = _gallery()
    assert gallery.index.kind == "ivf"
    gallery.save(tmp_path / "g")
    assert ImageGallery.load(tmp_path / "g").index.index.ntotal == 600 * 4

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "g", folder)
        change(folder)
        with pytest.raises(RetrievalError) as e:
            ImageGallery.load(folder)
        return str(e.value)

    def meta(folder, **update):
        data = json.loads((folder / "gallery.json").read_text())
        data.update(update)
        for key in [k for k, v in update.items() if v is None]:
            del data[key]
        (folder / "gallery.json").write_text(json.dumps(data))

    assert "has format 2" in broken("version", lambda f: meta(f, format=2))
    shutil.copytree(tmp_path / "g", tmp_path / "no-index-entry")  # (a KeyError before): tuned again on use
    meta(tmp_path / "no-index-entry", index=None)
    assert ImageGallery.load(tmp_path / "no-index-entry").index.index.ntotal == 600 * 4
    assert "feats.npy" in broken("shape", lambda f: np.save(f / "feats.npy", np.zeros((600, 16), np.float32)))
    other = _gallery(images=300, seed=1)
    monkeypatch.setattr(index_module, "APPROXIMATE_FROM", 500)
    other.save(tmp_path / "other")
    assert "belongs to another gallery" in broken(
        "foreign-index", lambda f: shutil.copy(tmp_path / "other" / "index.faiss", f / "index.faiss"))
    assert "not a FAISS index" in broken("corrupt", lambda f: (f / "index.faiss").write_bytes(b"\0" * 100))
    assert "feats.npy" in broken("pickled", lambda f: np.save(f / "feats.npy", np.array([{}], dtype=object)))


def test_concurrent_saves_of_one_gallery_leave_one_complete_folder(tmp_path):
    galleries = [_gallery(images=200, seed=s) for s in range(4)]
    target = tmp_path / "out" / "gallery"
    errors = []

    def save(g):
        try:
            g.save(target)
        except RetrievalError as e:  # ("exists": a save that started after another finished)
            errors.append(e)

    threads = [threading.Thread(target=save, args=(g,)) for g in galleries]
    [t.start() for t in threads]
    [t.join() for t in threads]
    loaded = ImageGallery.load(target)
    assert any(np.array_equal(np.asarray(loaded.feats), g.feats) for g in galleries)
    assert sorted(p.name for p in target.parent.iterdir()) == ["gallery"]  # no .partial or .old folders left
    assert all("exists" in str(e) for e in errors)
