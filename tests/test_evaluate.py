"""train.shapescaps.evaluate: the held-out ShapesCaps evaluation, for a checkpoint (PyTorch) and an engine folder
(runtime).

The models here are random, so these tests check the machinery: both backends give the same outputs, missing
capabilities are n/a, the metric rules (equivalence in recall, ITM negatives) hold, and the CLI behaves.
A fake backend whose outputs we control checks that perfect answers score 1 and wrong ones 0.
"""
import json
import logging
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from train.evaluation.backends import CapabilityError, EvaluationError, PipelineBackend, TorchBackend
from train.shapescaps.evaluate import (METRICS, add_arguments, evaluate, format_table, layout_key, main, pick_negatives,
                                       pick_questions, recall_at_1, run, shapes_key, similarity)
from train.shapescaps.synthetic import ShapesCaps

ROOT = Path(__file__).resolve().parents[1]
# the demo Q-Former tokenizer splits some ShapesCaps captions into more than 32 pieces: both backends cut them alike
pytestmark = pytest.mark.filterwarnings("ignore:text .* Q-Former tokens long")
N, TOKENS = 12, dict(caption_tokens=6, answer_tokens=3, batch_size=8)  # 8 + 4: a partial last batch


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """Stage-2 checkpoint with the Q-Former's text side (every capability) and its ONNX engine folder."""
    from export.build import build
    from train.blip2.random_checkpoint import make_random_checkpoint

    logging.getLogger("export.checkpoint").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("eval")
    # vocab 512: the tiny preset's byte-sized BPE makes ShapesCaps questions longer than the engine's prompt limit;
    # one layer per tower: the export dominates this file's time
    ck = make_random_checkpoint(root / "stage2", "tiny", stage=2, qformer_text=True, image_size=64, patch_size=16,
                                vocab_size=512, vision_layers=1, qformer_layers=1, llm_layers=1)
    return ck, build(ck, "onnx", root / "engines")


@pytest.fixture(scope="module")
def both_results(stage2):
    torch_backend, pipe_backend = TorchBackend(stage2[0]), PipelineBackend(stage2[1])
    return (evaluate(torch_backend, n=N, seed=0, **TOKENS), evaluate(pipe_backend, n=N, seed=0, **TOKENS),
            torch_backend, pipe_backend)


# ----------------------------------------------------------------------------- real models

def _in_batches(fn, size, *columns):
    out = []
    for start in range(0, len(columns[0]), size):
        out.extend(fn(*(c[start:start + size] for c in columns)))
    return out


def _recompute(backend, results, n, size, caption_tokens=30, answer_tokens=10) -> dict:
    """{metric: (fewest, most) correct} from the backend's own answers on the first n val samples (asked in batches
    of `size`, as evaluate does), with numpy and train.shapescaps.synthetic's correctness rules, never from what
    evaluate() concluded. The two differ only where a retrieval's top two are within 1e-6 (a float32 near-tie may go
    either way: an untrained model's similarities are nearly flat)."""
    from train.shapescaps.synthetic import caption_correct, vqa_correct

    samples = [ShapesCaps("val", n=n, image_size=backend.image_size, seed=0)[i] for i in range(n)]
    images, captions = [s.image for s in samples], [s.captions[0] for s in samples]
    expected = {}

    preds = _in_batches(lambda im: backend.caption(im, max_new_tokens=caption_tokens), size, images)
    expected["caption_accuracy"] = (sum(caption_correct(p, s) for p, s in zip(preds, samples)),) * 2

    # ITC: cosine of unit vectors, the largest over the image's queries; a top-1 text counts when it describes the
    # image, a top-1 image when the text describes it; ties go to the lower index
    img = np.concatenate(_in_batches(lambda im: [backend.image_feats(im)], size, images)).astype(np.float64)
    txt = np.concatenate(_in_batches(lambda t: [backend.text_feats(t)], size, captions)).astype(np.float64)
    sim = np.einsum("iqd,td->itq", img, txt).max(-1)
    describes = np.array([[caption_correct(c, s) for c in captions] for s in samples])
    for way, sims, hit in (("i2t", sim, lambda q, k: describes[q, k]), ("t2i", sim.T, lambda q, k: describes[k, q])):
        hits = [{bool(hit(q, int(k))) for k in np.flatnonzero(row >= row.max() - 1e-6)} for q, row in enumerate(sims)]
        expected[f"itc_r1_{way}"] = (sum(min(h) for h in hits), sum(max(h) for h in hits))

    # ITM: each image with its own caption (a match: probability > 0.5) and with a negative that does not describe it
    negatives = [r["itm_negative"] for r in results["per_sample"]]
    assert not any(caption_correct(neg, s) for neg, s in zip(negatives, samples))
    pos = np.concatenate(_in_batches(lambda im, t: [backend.itm(im, t)], size, images, captions))
    neg = np.concatenate(_in_batches(lambda im, t: [backend.itm(im, t)], size, images, negatives))
    expected["itm_accuracy"] = (int((pos > 0.5).sum() + (neg <= 0.5).sum()),) * 2

    # VQA: the question asked of each image is one of its own, answered greedily and matched to its answer
    questions = [r["question"] for r in results["per_sample"]]
    assert all(q in dict(s.qa) for q, s in zip(questions, samples))
    answers = _in_batches(lambda im, q: backend.answer(im, q, max_new_tokens=answer_tokens), size, images, questions)
    expected["vqa_accuracy"] = (sum(vqa_correct(a, dict(s.qa)[q]) for a, q, s in zip(answers, questions, samples)),) * 2
    return expected


def _assert_recomputed(results, expected, n):
    assert set(results["metrics"]) == set(METRICS)
    for name, m in results["metrics"].items():
        total = 2 * n if name == "itm_accuracy" else n
        fewest, most = expected[name]
        assert m["total"] == total and fewest <= m["correct"] <= most, (results.get("backend"), name, m, expected[name])
        assert m["value"] == pytest.approx(m["correct"] / total, abs=1e-12), (name, m)


def test_metrics_are_recomputed_from_the_random_models_answers(both_results):
    """Both real backends: every metric is what their own answers give (an untrained model: low, degenerate values;
    the seeded backend below has varied ones)."""
    for results, backend in zip(both_results[:2], both_results[2:]):
        expected = _recompute(backend, results, N, TOKENS["batch_size"], TOKENS["caption_tokens"],
                              TOKENS["answer_tokens"])
        _assert_recomputed(results, expected, N)


def test_torch_and_pipeline_agree(both_results):
    torch_res, pipe_res, torch_backend, pipe_backend = both_results
    for key in ("caption_pred", "answer_pred", "question", "itm_negative"):
        assert [r[key] for r in torch_res["per_sample"]] == [r[key] for r in pipe_res["per_sample"]], key
    for name in ("caption_accuracy", "itm_accuracy", "vqa_accuracy"):
        assert torch_res["metrics"][name]["value"] == pytest.approx(pipe_res["metrics"][name]["value"], abs=1e-4)
    # ITC: the similarities themselves agree (top-1 indices of an untrained model are near-ties, so they
    # may legitimately flip on 1e-8 differences; the trained demo model's test compares recalls exactly)
    images = [s.image for s in ShapesCaps("val", n=6, image_size=torch_backend.image_size, seed=0)]
    texts = [s.captions[0] for s in ShapesCaps("val", n=6, image_size=torch_backend.image_size, seed=0)]
    sims = [similarity(b.image_feats(images), b.text_feats(texts)) for b in (torch_backend, pipe_backend)]
    np.testing.assert_allclose(sims[0], sims[1], atol=1e-5)
    for key in ("itm_pos_prob", "itm_neg_prob"):
        got = np.array([r[key] for r in pipe_res["per_sample"]])
        assert np.abs(got - [r[key] for r in torch_res["per_sample"]]).max() < 1e-4
    samples = [ShapesCaps("val", n=3, image_size=64, seed=3)[i] for i in range(3)]
    images, texts = [s.image for s in samples], [s.captions[1] for s in samples]
    assert np.abs(torch_backend.image_feats(images) - pipe_backend.image_feats(images)).max() < 1e-4
    assert np.abs(torch_backend.text_feats(texts) - pipe_backend.text_feats(texts)).max() < 1e-4
    assert torch_backend.answer(images, ["how many shapes are there?"] * 3, max_new_tokens=3) == \
        pipe_backend.answer(images, ["how many shapes are there?"] * 3, max_new_tokens=3)


def test_stage1_checkpoint_has_no_llm_metrics(tmp_path):
    from train.blip2.random_checkpoint import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "stage1", "tiny", stage=1, image_size=64, patch_size=16)
    backend = TorchBackend(ck)
    assert backend.capabilities == {"itc", "itm"}
    results = evaluate(backend, n=4, seed=1)
    for name in ("caption_accuracy", "vqa_accuracy"):
        m = results["metrics"][name]
        assert m["status"] == "n/a" and m["value"] is None and m["passed"] is None and "stage-1" in m["reason"]
    for name in ("itc_r1_i2t", "itc_r1_t2i", "itm_accuracy"):
        assert results["metrics"][name]["status"] == "ok"
    assert "caption_pred" not in results["per_sample"][0]
    table = format_table(results)
    assert [line.split("|")[3].strip() for line in table.splitlines()
            if line.startswith("VQA") and "|" in line] == ["n/a"]
    with pytest.raises(CapabilityError, match="no language model"):
        backend.caption([ShapesCaps("val", n=1, image_size=64)[0].image])


def test_pipeline_without_graphs_is_na(stage2):
    backend = PipelineBackend(stage2[1])
    for graph in ("qformer_text", "qformer_itm"):
        del backend.pipe.runners[graph]
    assert backend.capabilities == {"caption", "vqa"}
    results = evaluate(backend, n=2, seed=0, caption_tokens=2, answer_tokens=2)
    assert [n for n, m in results["metrics"].items() if m["status"] == "n/a"] == \
        ["itc_r1_i2t", "itc_r1_t2i", "itm_accuracy"]
    assert "qformer_text graph" in results["metrics"]["itc_r1_i2t"]["reason"]
    del backend.pipe.runners["llm_decoder"]
    results = evaluate(backend, n=2, seed=0)
    assert all(m["status"] == "n/a" for m in results["metrics"].values())
    assert "n/a" in format_table(results) and results["passed"]  # nothing measured, nothing failed


# ----------------------------------------------------------------------------- metric rules

def _val(n, seed=0):
    ds = ShapesCaps("val", n=n, image_size=32, seed=seed)
    return [ds.sample(i, render_image=False) for i in range(n)]


def test_itm_negatives_are_never_equivalent_and_deterministic():
    samples = _val(80)
    negatives = pick_negatives(samples, seed=0)
    assert all(shapes_key(neg) != shapes_key(s) and layout_key(neg) != layout_key(s)
               for s, neg in zip(samples, negatives))
    assert [neg.index for neg in pick_negatives(samples, seed=0)] == [neg.index for neg in negatives]
    assert [neg.index for neg in pick_negatives(samples, seed=1)] != [neg.index for neg in negatives]
    # questions are per sample: the first ones do not change when more samples follow
    assert pick_questions(samples[:10], 0) == pick_questions(samples, 0)[:10]
    # a lone sample takes its negative from further samples
    extra = _val(5)[1:]
    (neg,) = pick_negatives(samples[:1], seed=0, extra=extra)
    assert layout_key(neg) != layout_key(samples[0])
    with pytest.raises(EvaluationError, match="ITM negative"):
        pick_negatives(samples[:1], seed=0)


def test_recall_counts_an_equivalent_item_as_correct():
    # two val samples holding the same shapes (different pixels and usually different captions)
    samples = _val(300)
    groups = Counter(shapes_key(s) for s in samples)
    a, b = _twins(samples, groups)
    c = next(s for s in samples if shapes_key(s) != shapes_key(a))
    keys = [shapes_key(a), shapes_key(b), shapes_key(c)]
    assert keys[0] == keys[1] != keys[2]
    sim = np.array([[0.5, 0.9, 0.1],    # image a retrieves b's caption: equivalent, counts
                    [0.9, 0.5, 0.2],    # image b retrieves a's caption: counts
                    [0.9, 0.1, 0.15]])  # image c retrieves a's caption: wrong
    r = recall_at_1(sim, keys)
    assert r["i2t_top1"] == [1, 0, 0] and r["i2t"] == pytest.approx(2 / 3) and r["i2t_exact"] == 0.0
    # text -> image (columns): text a retrieves image b (tie with c, lower index wins) and text b image a: both
    # count; text c retrieves image b: wrong
    assert r["t2i_top1"] == [1, 0, 1] and r["t2i"] == pytest.approx(2 / 3) and r["t2i_exact"] == 0.0


def _twins(samples, groups):
    key = next(k for k, v in groups.items() if v > 1)
    return [s for s in samples if shapes_key(s) == key][:2]


class FakeBackend:
    """Reads the ground truth back from each image: perfect=True answers everything right, False everything wrong."""

    name, image_size, folder = "fake", 32, "nowhere"

    def __init__(self, n, seed=0, perfect=True, capabilities=("caption", "vqa", "itc", "itm")):
        ds = ShapesCaps("val", n=n + 1000, image_size=self.image_size, seed=seed)
        self.by_image = {ds[i].image.tobytes(): ds[i] for i in range(n)}
        self.by_text = {}
        for i in range(n + 1000):  # ITM negatives may come from beyond n
            s = ds.sample(i, render_image=False)
            self.by_text.setdefault(s.captions[0], s)
        self.keys = {k: i for i, k in enumerate(sorted({shapes_key(s) for s in self.by_text.values()}))}
        self.perfect, self.capabilities, self.missing = perfect, frozenset(capabilities), {}

    def _samples(self, images):
        return [self.by_image[im.tobytes()] for im in images]

    def caption(self, images, max_new_tokens=30):
        return [s.captions[1] if self.perfect else "nothing to see" for s in self._samples(images)]

    def answer(self, images, questions, max_new_tokens=10):
        return [dict(s.qa)[q].upper() + "." if self.perfect else "banana"
                for s, q in zip(self._samples(images), questions)]

    def _onehot(self, sample):
        v = np.zeros(len(self.keys))
        v[self.keys[shapes_key(sample)]] = 1.0
        return v

    def image_feats(self, images):
        return np.stack([[self._onehot(s), np.zeros(len(self.keys))] for s in self._samples(images)])  # Nq = 2

    def text_feats(self, texts):
        v = np.stack([self._onehot(self.by_text[t]) for t in texts])
        return v if self.perfect else (1 - v) / np.sqrt(len(self.keys) - 1)  # closest to every other key

    def itm(self, images, texts):
        same = np.array([shapes_key(s) == shapes_key(self.by_text[t]) for s, t in zip(self._samples(images), texts)])
        return np.where(same == self.perfect, 0.9, 0.1)


def test_perfect_backend_scores_one_and_wrong_backend_zero():
    n = 60
    perfect = evaluate(FakeBackend(n), n=n, seed=0, batch_size=7)
    assert {k: m["value"] for k, m in perfect["metrics"].items()} == {k: 1.0 for k in METRICS}
    assert perfect["passed"]
    # val[:60] repeats some shapes: recall counts the equivalent item, exact recall does not
    keys = [shapes_key(s) for s in _val(n)]
    assert len(set(keys)) < n
    assert perfect["metrics"]["itc_r1_t2i"]["exact_value"] < 1.0
    wrong = evaluate(FakeBackend(n, perfect=False), n=n, seed=0, batch_size=7)
    assert {k: m["value"] for k, m in wrong["metrics"].items()} == {k: 0.0 for k in METRICS}
    assert not wrong["passed"]


class SeededBackend(FakeBackend):
    """Answers that are right for some samples and wrong for others, and random (seeded) ITC features and ITM
    probabilities: every metric lands strictly between 0 and 1, where a miscounting rule shows."""

    def caption(self, images, max_new_tokens=30):
        return [s.captions[1] if s.index % 3 else "nothing to see" for s in self._samples(images)]

    def answer(self, images, questions, max_new_tokens=10):
        right = super().answer(images, questions)
        return [a if s.index % 4 != 1 else "banana" for a, s in zip(right, self._samples(images))]

    def image_feats(self, images):
        feats = np.stack([np.random.default_rng(s.index).standard_normal((2, 8)) for s in self._samples(images)])
        return feats / np.linalg.norm(feats, axis=-1, keepdims=True)

    def text_feats(self, texts):
        feats = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8) for t in texts])
        return feats / np.linalg.norm(feats, axis=-1, keepdims=True)

    def itm(self, images, texts):
        return np.array([np.random.default_rng([s.index, zlib.crc32(t.encode())]).uniform()
                         for s, t in zip(self._samples(images), texts)])


def test_metrics_are_recomputed_from_a_seeded_backends_answers():
    n = 40
    backend = SeededBackend(n)
    results = evaluate(backend, n=n, seed=0, batch_size=7)
    expected = _recompute(backend, results, n, 7)
    assert all(fewest == most for fewest, most in expected.values()), expected  # no near-ties: exact counts
    assert all(0 < expected[name][0] < (2 * n if name == "itm_accuracy" else n) for name in METRICS), expected
    _assert_recomputed(results, expected, n)


class PartialBackend(FakeBackend):
    """FakeBackend right except where told: wrong captions / answers for the samples in `caption_wrong` /
    `vqa_wrong`, zero ITC features for the images in `itc_blind`, ITM probabilities reversed for `itm_flipped`."""

    def __init__(self, n, caption_wrong=(), vqa_wrong=(), itc_blind=(), itm_flipped=(), **kwargs):
        super().__init__(n, **kwargs)
        self.caption_wrong, self.vqa_wrong = set(caption_wrong), set(vqa_wrong)
        self.itc_blind, self.itm_flipped = set(itc_blind), set(itm_flipped)

    def caption(self, images, max_new_tokens=30):
        return [s.captions[1] if s.index not in self.caption_wrong else "nothing to see" for s in self._samples(images)]

    def answer(self, images, questions, max_new_tokens=10):
        right = super().answer(images, questions)
        return [a if s.index not in self.vqa_wrong else "banana" for a, s in zip(right, self._samples(images))]

    def image_feats(self, images):
        feats = super().image_feats(images)
        feats[[s.index in self.itc_blind for s in self._samples(images)]] = 0.0
        return feats

    def itm(self, images, texts):
        probs = super().itm(images, texts)
        flip = np.array([s.index in self.itm_flipped for s in self._samples(images)])
        return np.where(flip, 1.0 - probs, probs)


# The targets as train/shapescaps/evaluate.py's docstring states them: caption >= 0.90, ITC R@1 >= 0.90 both ways,
# ITM >= 0.95, VQA >= 0.90
TARGETS = {"caption accuracy": 0.90, "ITC R@1 image->text": 0.90, "ITC R@1 text->image": 0.90, "ITM accuracy": 0.95,
           "VQA exact match": 0.90}


def _table_rows(results):
    lines = format_table(results).splitlines()
    return {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines if "|" in line}


def test_partial_answers_score_their_fraction_and_the_table_compares_them_to_the_targets():
    """20 samples, wrong on known ones: caption 18/20 = 0.90 (at its target: pass), VQA 17/20 = 0.85 (fail), ITM with
    one image's two pairs reversed 38/40 = 0.95 (at its target: pass), ITC with 3 images blind (zero features: they
    and their captions retrieve index 0, whose pair does not match theirs) 17/20 = 0.85 both ways (fail)."""
    from train.shapescaps.synthetic import caption_correct

    n = 20
    samples = [ShapesCaps("val", n=n, image_size=FakeBackend.image_size, seed=0)[i] for i in range(n)]
    keys = Counter(shapes_key(s) for s in samples)
    blind = [s.index for s in samples[1:] if keys[shapes_key(s)] == 1  # no twin to retrieve instead
             and not caption_correct(samples[0].captions[0], s) and not caption_correct(s.captions[0], samples[0])][:3]
    assert len(blind) == 3
    backend = PartialBackend(n, caption_wrong=(3, 11), vqa_wrong=(0, 7, 19), itc_blind=blind, itm_flipped=(5,))
    results = evaluate(backend, n=n, batch_size=7)
    values = {"caption accuracy": (18, 20), "ITC R@1 image->text": (17, 20), "ITC R@1 text->image": (17, 20),
              "ITM accuracy": (38, 40), "VQA exact match": (17, 20)}
    assert {m["label"]: m["value"] for m in results["metrics"].values()} == \
        {label: pytest.approx(c / t, abs=1e-12) for label, (c, t) in values.items()}

    table = _table_rows(results)
    for label, (correct, total) in values.items():
        mark = "pass" if correct / total >= TARGETS[label] - 1e-12 else "FAIL"
        assert table[label][1:4] == [f"{correct / total:.3f} ({correct}/{total})", f">= {TARGETS[label]:.2f}", mark]
    assert [table[label][3] for label in values] == ["pass", "FAIL", "FAIL", "pass", "FAIL"]
    assert "2/5 available metrics meet their target" in format_table(results)

    # a metric the model cannot serve is n/a, neither pass nor fail, and leaves the others as they were
    results = evaluate(PartialBackend(n, caption_wrong=(3, 11), capabilities=("caption", "vqa")), n=n)
    table = _table_rows(results)
    assert table["ITM accuracy"][1:4] == ["n/a", ">= 0.95", "n/a"]
    assert table["caption accuracy"][1:4] == ["0.900 (18/20)", ">= 0.90", "pass"]
    assert table["VQA exact match"][1:4] == ["1.000 (20/20)", ">= 0.90", "pass"]


def test_evaluate_rejects_bad_sizes():
    fake = FakeBackend(1)
    for kwargs in ({"n": 0}, {"seed": -1}, {"batch_size": 0}, {"n": 2.5}):
        with pytest.raises(EvaluationError):
            evaluate(fake, **kwargs)


# ----------------------------------------------------------------------------- CLI

def _args(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train eval")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_json(stage2, tmp_path, capsys):
    out = tmp_path / "results" / "onnx.json"
    assert run(_args(["--engines", str(stage2[1]), "--n", "3", "--seed", "2", "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "caption accuracy" in printed and "ITM accuracy" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["backend"] == "pipeline" and data["n"] == 3 and data["seed"] == 2
    assert set(data["metrics"]) == set(METRICS) and len(data["per_sample"]) == 3
    assert all(0 <= m["value"] <= 1 for m in data["metrics"].values())


@pytest.mark.parametrize("argv, message", [
    ([], "pass exactly one of --model DIR"),
    (["--model", "a", "--engines", "b"], "got both"),
    (["--model", "{tmp}/missing"], "--model folder not found"),
    (["--engines", "{tmp}/missing"], "build one with `python -m export.build"),
    (["--model", "{engine}"], "is an engine folder, not a checkpoint; pass it with --engines"),
    (["--engines", "{checkpoint}"], "is a checkpoint folder, not an engine folder; pass it with --model"),
    (["--engines", "{engine}", "--n", "0"], "n must be an integer >= 1"),
    (["--engines", "{engine}", "--out", "{tmp}"], "is a folder; pass a file name"),
    (["--model", "{tmp}"], "no config.json"),  # load_checkpoint's own message
])
def test_cli_errors_name_the_fix(argv, message, stage2, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "engine": str(stage2[1]), "checkpoint": str(stage2[0])}
    assert run(_args([a.format(**fill) for a in argv])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_module_runs_by_itself(tmp_path):
    for module in (["train.shapescaps.evaluate"], ["train", "eval"]):
        proc = subprocess.run([sys.executable, "-m", *module, "--model", str(tmp_path / "nope")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "--model folder not found" in proc.stderr, proc.stderr
    assert main(["--engines", str(tmp_path / "nope")]) == 1


def test_engine_evaluation_needs_no_torch(stage2, tmp_path):
    """An engine folder is evaluated with the runtime alone (deployment machines have no torch)."""
    out = tmp_path / "r.json"
    code = ("import sys; from train.shapescaps.evaluate import main; "
            f"rc = main(['--engines', {str(stage2[1])!r}, '--n', '2', '--out', {str(out)!r}]); "
            "sys.exit(rc or 10 * any(m in sys.modules for m in ('torch', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["metrics"]["vqa_accuracy"]["total"] == 2


def test_comparison_against_a_baseline_flags_losses_beyond_the_precision_budget():
    from train.shapescaps.evaluate import format_comparison

    def res(precision, itc, vqa):
        ok = lambda v: {"label": "x", "status": "ok", "value": v}  # noqa: E731
        return {"precision": precision, "folder": "engines/m/onnx",
                "metrics": {"itc_r1_i2t": {**ok(itc), "label": "ITC R@1 image->text"},
                            "vqa": {**ok(vqa), "label": "VQA exact match"},
                            "itm": {"label": "ITM accuracy", "status": "n/a", "reason": "no ITM graph"}}}

    table = format_comparison(res("fp32", 0.900, 0.800), res("int8", 0.885, 0.700))
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in table.splitlines()[1:]}
    assert rows["ITC R@1 image->text"][3:] == ["-1.5", "yes"]  # int8 may lose 2 points
    assert rows["VQA exact match"][3:] == ["-10.0", "NO"]
    assert rows["ITM accuracy"][1] == "n/a"
    fp16 = format_comparison(res("fp32", 0.900, 0.800), res("fp16", 0.893, 0.810))
    assert "within 0.5 points" in fp16 and "NO" in fp16 and "+1.0" in fp16  # -0.7 fails, a gain passes
