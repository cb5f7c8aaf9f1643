"""train.shapescaps.evaluate: the held-out ShapesCaps evaluation, for a checkpoint (PyTorch) and an engine folder (runtime).

The models here are random, so these tests check the machinery: both backends give the same outputs, missing
capabilities are n/a, the metric rules (equivalence in recall, ITM negatives) hold, and the CLI behaves.
A fake backend whose outputs we control checks that perfect answers score 1 and wrong ones 0.
"""
import json
import logging
import subprocess
import sys
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
    return ck, build(ck, "onnx", root / "engines", say=lambda *_: None)


@pytest.fixture(scope="module")
def both_results(stage2):
    torch_backend, pipe_backend = TorchBackend(stage2[0]), PipelineBackend(stage2[1])
    return (evaluate(torch_backend, n=N, seed=0, **TOKENS), evaluate(pipe_backend, n=N, seed=0, **TOKENS),
            torch_backend, pipe_backend)


# ----------------------------------------------------------------------------- real models

def test_every_metric_in_unit_range(both_results, stage2):
    for results, folder in zip(both_results[:2], stage2):
        assert results["n"] == N and results["seed"] == 0 and results["folder"] == str(Path(folder).resolve())
        assert set(results["metrics"]) == set(METRICS)
        for name, m in results["metrics"].items():
            assert m["status"] == "ok", (name, m)
            assert 0.0 <= m["value"] <= 1.0 and m["passed"] == (m["value"] >= m["target"])
            assert m["seconds"] >= 0
        assert results["metrics"]["itm_accuracy"]["total"] == 2 * N
        assert {"data", "caption", "itc", "itm", "vqa", "total"} <= set(results["seconds"])
        assert "caption_correct" in results["equivalence"]
        json.dumps(results)  # serialisable as it is
    assert both_results[0]["backend"] == "torch" and both_results[1]["backend"] == "pipeline"


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
    assert [line.split("|")[3].strip() for line in table.splitlines() if line.startswith("VQA") and "|" in line] == ["n/a"]
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


def test_table_marks_pass_and_fail():
    def rows(results):
        lines = format_table(results).splitlines()
        return {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines if "|" in line}

    perfect = rows(evaluate(FakeBackend(8), n=8))
    assert all(perfect[label][3] == "pass" and perfect[label][2] == f">= {target:.2f}"
               for label, target, _ in METRICS.values())
    assert perfect["caption accuracy"][1] == "1.000 (8/8)"
    results = evaluate(FakeBackend(8, perfect=False, capabilities=("caption", "itc")), n=8)
    results["metrics"]["itc_r1_i2t"]["value"], results["metrics"]["itc_r1_i2t"]["passed"] = 0.95, True
    table = rows(results)
    assert table["caption accuracy"][3] == "FAIL" and table["ITC R@1 image->text"][3] == "pass"
    assert table["ITM accuracy"][1:4] == ["n/a", ">= 0.95", "n/a"]


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
