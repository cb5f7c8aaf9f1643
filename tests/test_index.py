"""The ITC search index of an image gallery (runtime/index.py): exact numpy search against a direct computation,
FAISS flat and IVF against exact search, and galleries saved, loaded (memory-mapped) and extended."""
import numpy as np
import pytest

from runtime import index as index_module
from runtime.index import ExactIndex, FaissIndex, build_index
from runtime.retrieval import ImageGallery, RetrievalError


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _gallery(images=3000, queries=8, width=32, seed=0):
    """Clustered features, as real ITC features are (images of a kind look alike): 40 centres plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, width))
    kind = rng.integers(0, 40, images)
    feats = _unit(centres[kind][:, None] + 0.6 * rng.standard_normal((images, queries, width)))
    texts = _unit(centres[rng.integers(0, 40, 24)] + 0.6 * rng.standard_normal((24, width)))
    return feats, texts


def _brute_force(feats, text, k):
    """Max over each image's queries, computed one image at a time; best first, ties by lower index."""
    scores = np.array([max(float(q @ text) for q in image) for image in feats])
    order = sorted(range(len(feats)), key=lambda i: (-scores[i], i))[:k]
    return np.array(order), scores[order]


def test_exact_index_is_the_max_over_queries():
    feats, texts = _gallery(images=200)
    for text in texts[:5]:
        ids, scores = ExactIndex(feats).search(text, 7)
        want_ids, want_scores = _brute_force(feats, text, 7)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_index_finds_the_exact_top_k(kind):
    pytest.importorskip("faiss")
    feats, texts = _gallery()
    index = FaissIndex.build(feats, approximate_from=1000 if kind == "ivf" else 10 ** 9)
    assert index.kind == kind
    if kind == "ivf":  # tuned at build time until it finds the exact top k of its probes, for each k
        assert min(index.recalls.values()) >= index_module.RECALL_TARGET
        nprobes = [index.nprobes[k] for k in index_module.PROBE_KS]
        assert nprobes == sorted(nprobes) and 1 <= nprobes[0] < index.index.nlist
    same = 0
    for text in texts:
        ids, scores = index.search(text, 16)
        want_ids, want_scores = ExactIndex(feats).search(text, 16)
        found = dict(zip(ids.tolist(), scores.tolist()))
        exact = dict(zip(want_ids.tolist(), want_scores.tolist()))
        # whatever it finds carries its exact score, best first (candidates re-scored exactly)
        np.testing.assert_allclose([found[i] for i in ids.tolist() if i in exact],
                                   [exact[i] for i in ids.tolist() if i in exact], atol=1e-6)
        assert (np.diff(scores) <= 0).all()
        same += np.array_equal(ids, want_ids)
    assert same == len(texts) if kind == "flat" else same >= len(texts) - 1, same


def test_ivf_finds_a_large_top_k_as_well_as_a_small_one():
    """An nprobe tuned for the top 16 alone found 88% of the top 128 on clustered features: each k has its own,
    and a k beyond the tuned ones is tuned when first asked for."""
    pytest.importorskip("faiss")
    feats, texts = _gallery(images=4000, queries=8, width=32, seed=5)
    index = FaissIndex.build(feats, approximate_from=1000)
    assert index.kind == "ivf" and index.nprobe_for(128) > index.nprobe_for(16)
    for k in (128, 400):
        recall = [len(set(index.search(t, k)[0].tolist()) & set(ExactIndex(feats).search(t, k)[0].tolist())) / k
                  for t in texts]
        assert np.mean(recall) >= 0.97, (k, np.mean(recall))
    assert 512 in index.nprobes  # k = 400: tuned on first use for the next power of two


def test_small_galleries_and_no_faiss_search_exactly(monkeypatch):
    feats, _ = _gallery(images=100)  # 800 query vectors
    assert isinstance(build_index(feats, approximate_from=801), ExactIndex)
    if index_module.faiss_available():
        assert build_index(feats, approximate_from=800).kind == "ivf"
    noise = _unit(np.random.default_rng(3).standard_normal((300, 8, 32)))  # no clusters for IVF to find
    if index_module.faiss_available():
        fallback = build_index(noise, approximate_from=800)
        assert isinstance(fallback, ExactIndex) and "exact search is faster" in fallback.describe()["why"]
    monkeypatch.setattr(index_module.importlib.util, "find_spec", lambda name: None)
    assert isinstance(build_index(feats, approximate_from=800), ExactIndex)  # without FAISS: exact at any size


def test_gallery_saves_loads_memory_mapped_and_extends(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    feats, texts = _gallery(images=1200)
    embeds = np.random.default_rng(1).standard_normal((1200, 5, 12)).astype(np.float32)
    monkeypatch.setattr(index_module, "APPROXIMATE_FROM", 4000)  # 1000 x 8 vectors: IVF
    first = ImageGallery(feats[:1000], embeds[:1000])
    assert first.index.kind == "ivf"
    whole = first.extend(ImageGallery(feats[1000:], embeds[1000:]))  # vectors added to the trained index
    assert whole.index is first.index and whole.index.index.ntotal == 1200 * 8
    np.testing.assert_array_equal(whole.feats, feats)
    whole.save(tmp_path / "g")
    loaded = ImageGallery.load(tmp_path / "g")
    assert isinstance(loaded.feats, np.memmap) and loaded.embeds.dtype == np.float16
    np.testing.assert_allclose(loaded.embeds, embeds, rtol=1e-3, atol=1e-3)
    assert loaded.index.kind == "ivf" and loaded.index.nprobes == whole.index.nprobes
    assert loaded.index.recalls == whole.index.recalls
    for text in texts[:6]:
        np.testing.assert_array_equal(loaded.search(text, 10)[0], whole.search(text, 10)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # nothing else left behind
    with pytest.raises(RetrievalError, match="exists; save the gallery to a new folder"):
        whole.save(tmp_path / "g")
    with pytest.raises(RetrievalError, match="could not read .*missing/gallery.json"):
        ImageGallery.load(tmp_path / "missing")
    with pytest.raises(RetrievalError, match="1200 feature rows but 3 image embeddings"):
        ImageGallery(feats, embeds[:3])
    with pytest.raises(RetrievalError, match="extend takes an ImageGallery, not list; encode the images first"):
        whole.extend(["more.png"])
    assert len(first) == 1000  # extend returned a new gallery; this one is as it was


def test_rows_float32_reads_the_rows_a_query_reranks(tmp_path):
    """The re-rank's read of k image embeddings (float16, memory-mapped, converted by ONNX Runtime) equals
    numpy's plain conversion, in the order asked for; float32 rows come back as they are."""
    from runtime.retrieval import rows_float32

    rng = np.random.default_rng(0)
    stored = rng.standard_normal((300, 65, 128)).astype(np.float16)
    np.save(tmp_path / "embeds.npy", stored)
    mapped = np.load(tmp_path / "embeds.npy", mmap_mode="r")
    for rows in (rng.choice(300, 7, replace=False), rng.choice(300, 200, replace=False)):  # 58k, 1.7M values
        got = rows_float32(mapped, rows)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (len(rows), 65, 128)
        np.testing.assert_array_equal(got, stored[rows].astype(np.float32))
    np.testing.assert_array_equal(rows_float32(stored.astype(np.float32), rows), stored[rows].astype(np.float32))


def test_float16_cast_model_is_one_cast_and_converts_every_float16_value_as_numpy_does():
    """runtime.ort_runner' 77-byte model is what onnx.helper builds for one Cast float16 -> float32, and ONNX
    Runtime's conversion through it equals numpy's for all 65,536 float16 bit patterns (subnormals, infinities;
    NaNs stay NaN)."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.ort_runner import FLOAT16_CAST_MODEL, float16_to_float32

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "cast",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    assert onnx.load_from_string(FLOAT16_CAST_MODEL) == model
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 16, 16)
    got, want = float16_to_float32(every), every.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == every.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
