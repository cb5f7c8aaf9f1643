"""Training on a user's data: formats, streaming, starting points, resume, the commands, standard metrics."""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from train.shapescaps.synthetic import write_files
from train.training.datasets import DataError
from train.training.datasets import open_dataset

DEMO = ROOT / "models" / "demo"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ShapesCaps written as a user's data: COCO captions, JSONL (captions + VQA), WebDataset shards; a BERT."""
    from train.blip2.random_checkpoint import make_bert

    root = tmp_path_factory.mktemp("userdata")
    write_files(root / "train", 24, "train", image_size=64)
    write_files(root / "val", 8, "val", image_size=64)
    rows = [json.loads(line) for line in (root / "train" / "train.jsonl").read_text().splitlines()]
    for shard, part in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for k, row in enumerate(part):
                key = f"s{shard}/{k:05d}"
                tar.add(root / "train" / row["image"], arcname=f"{key}.png")
                body = json.dumps({x: v for x, v in row.items() if x != "image"}).encode()
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    (root / "shards").mkdir()
    for s in (0, 1):
        os.replace(root / f"shard-{s}.tar", root / "shards" / f"shard-{s}.tar")
    make_bert(root / "bert", hidden=128, layers=2, heads=4, intermediate=256, vocab=200)
    return root


def _pixels(data, i):
    return np.asarray(data.load(i))


def test_the_three_formats_read_the_same_examples_and_images(files):
    coco = open_dataset(files / "train" / "captions_train.json", images=files / "train" / "images")
    jsonl = open_dataset(files / "train" / "train.jsonl")
    shards = open_dataset(files / "shards")
    assert len(coco) == 24 and coco.kinds == {"caption"}
    assert jsonl.kinds == {"caption", "vqa"} and len(jsonl.only("caption")) == 24
    caps = lambda d: [e.captions for e in d.only("caption").examples]  # noqa: E731
    assert caps(coco) == caps(jsonl)
    assert [(e.question, e.answers) for e in jsonl.only("vqa").examples] == \
        [(e.question, e.answers) for e in shards.only("vqa").examples]
    # the WebDataset groups the same image's caption rows per shard member: same texts, same pixels
    assert sorted(c for t in caps(shards) for c in t) == sorted(c for t in caps(jsonl) for c in t)
    first = shards.only("caption")
    image = next(i for i, e in enumerate(jsonl.examples)
                 if e.captions and e.captions[0] == first.examples[0].captions[0])
    assert np.array_equal(_pixels(first, 0), _pixels(jsonl, image))


@pytest.mark.parametrize("case", ["missing-images", "empty-caption", "no-answers", "unknown-format", "no-images-dir",
                                  "no-caption-key"])
def test_bad_data_is_refused_naming_the_fix(files, tmp_path, case):
    if case == "missing-images":
        rows = [{"image": f"gone{i}.png", "caption": "a red circle"} for i in range(3)]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match="3 images .* missing.*--max-bad 3"):
            open_dataset(tmp_path / "d.jsonl")
        return
    path, images, match = tmp_path / "d.jsonl", None, None
    if case == "empty-caption":
        path.write_text(json.dumps({"image": "a.png", "caption": "  "}) + "\n")
        match = "caption is empty"
    elif case == "no-answers":
        path.write_text(json.dumps({"image": "a.png", "question": "what colour?"}) + "\n")
        match = "VQA row needs \"answers\""
    elif case == "no-caption-key":
        path.write_text(json.dumps({"image": "a.png", "label": 3}) + "\n")
        match = "neither \"caption\".*keys: image, label"
    elif case == "unknown-format":
        path = tmp_path / "d.csv"
        path.write_text("image,caption\n")
        match = "cannot tell the format.*COCO captions file.*JSONL.*WebDataset"
    else:
        path, match = files / "train" / "captions_train.json", "pass the folder holding its images with --images"
    with pytest.raises(DataError, match=match):
        open_dataset(path, images)


def test_missing_images_within_max_bad_are_skipped_and_listed(files, tmp_path):
    rows = [{"image": str(files / "train" / "images" / "train_00000.png"), "caption": "a red circle"},
            {"image": "gone.png", "caption": "a blue square"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = open_dataset(tmp_path / "d.jsonl", max_bad=1)
    assert len(data) == 1 and data.skipped == [str(tmp_path / "gone.png")]


def _stream(data, **kw):
    from runtime.image import ImageProcessorConfig
    from train.training.streaming import ImageStream
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    pre = ImageProcessorConfig.from_hf_dict(BlipImageProcessorPil(size={"height": 64, "width": 64}).to_dict())
    return ImageStream(data, pre, **{"batch_size": 4, "seed": 0, "workers": 0, **kw}), pre


def test_a_step_reads_the_same_images_whether_resumed_or_not(files):
    data = open_dataset(files / "train" / "train.jsonl").only("caption")
    straight, pre = _stream(data, workers=1)
    batches = [straight.batch(s) for s in range(8)]  # 8 steps of 4 out of 24: crosses into the second epoch
    resumed, _ = _stream(data)
    again = resumed.batch(5)
    assert np.array_equal(again["index"], batches[5]["index"])
    assert torch.equal(again["pixels"], batches[5]["pixels"])
    # the runtime's preprocessing of the file, nothing else
    assert torch.equal(again["pixels"][0], torch.from_numpy(pre([data.load(int(again["index"][0]))])[0]))
    # every example once per epoch (6 steps of 4 = 24)
    assert sorted(np.concatenate([b["index"] for b in batches[:6]]).tolist()) == list(range(24))


def test_the_feature_cache_serves_later_epochs_without_decoding(files, tmp_path):
    from train.training.sources import stage1_start
    from train.training.streaming import FeatureCache

    model, _ = stage1_start(vision=DEMO, qformer_init=files / "bert", num_queries=4)
    data = open_dataset(files / "train" / "train.jsonl").only("caption")
    v = model.config.vision_config
    cache = FeatureCache(tmp_path / "cache", len(data), ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size), "x")
    stream, _ = _stream(data, batch_size=8, cache=cache)
    with torch.no_grad():
        first = [stream.image_embeds(model, stream.batch(s)) for s in range(3)]  # epoch 0: every image once
        assert cache.filled.all()
        later = stream.batch(3)  # epoch 1
        assert not later["fresh"].any() and "pixels" not in later
        cached = stream.image_embeds(model, later)
        direct = model.encode_image(torch.from_numpy(np.stack(
            [stream.preprocess([data.load(int(i))])[0] for i in later["index"]])))
    torch.testing.assert_close(cached, direct, atol=2e-3, rtol=2e-3)  # float16 storage
    assert len(first) == 3


def test_an_unreadable_image_is_replaced_and_counted_or_stops_the_run(files, tmp_path):
    rows = [json.loads(line) for line in (files / "train" / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "caption" in r]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows[0] = {"image": str(broken), "caption": "a red circle"}
    for r in rows[1:]:
        r["image"] = str(files / "train" / r["image"])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = open_dataset(tmp_path / "d.jsonl")
    bad = data.examples.index(next(e for e in data.examples if e.image == str(broken)))
    step = next(s for s in range(6) if bad in _stream(data)[0].order.indices(s, 0))
    stream, _ = _stream(data, max_bad=1)
    batch = stream.batch(step)
    assert bad not in batch["index"] and len(batch["index"]) == 4 and list(stream.bad) == [bad]
    with pytest.raises(DataError, match="1 images could not be decoded.*broken.png.*--max-bad"):
        _stream(data, max_bad=0)[0].batch(step)


def test_qformer_from_bert_takes_its_weights_as_blip2_does(files):
    from safetensors.torch import load_file

    from train.training.sources import stage1_start

    model, qtok = stage1_start(vision=DEMO, qformer_init=files / "bert", num_queries=4)
    bert = load_file(str(files / "bert" / "model.safetensors"))
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.attention.attention.query.weight, bert["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(layer.output_query.dense.weight, bert["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(layer.intermediate_query.dense.weight, bert["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(model.qformer.layernorm.weight, bert["bert.embeddings.LayerNorm.weight"])
    words = bert["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(model.embeddings.word_embeddings.weight[: len(words)], words)
    assert model.embeddings.word_embeddings.weight.shape[0] == len(qtok) and "[DEC]" in qtok.get_vocab()
    assert model.edge.dec_token_id == qtok.convert_tokens_to_ids("[DEC]")
    assert (hasattr(model.qformer.encoder.layer[0], "crossattention")
            and not model.qformer.encoder.layer[1].has_cross_attention)
    demo = load_file(str(DEMO / "model.safetensors"))
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight,
                       demo["vision_model.embeddings.patch_embedding.weight"].float())


def _train(*argv) -> int:
    from train.__main__ import main

    return main(list(map(str, argv)))


def test_stage1_stage2_finetune_on_files_write_checkpoints_hugging_face_loads(files, tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    common = ["--steps", 2, "--batch-size", 4, "--workers", 1, "--log-every", 1]
    coco = ["--data", files / "train" / "captions_train.json", "--images", files / "train" / "images"]
    assert _train("stage1", *coco, "--vision", DEMO, "--qformer-init", files / "bert", "--num-queries", 4,
                  "--out", tmp_path / "s1", "--run-dir", tmp_path / "r1", *common) == 0
    assert _train("stage2", "--data", files / "train" / "train.jsonl", "--init", tmp_path / "s1", "--llm", DEMO,
                  "--out", tmp_path / "s2", "--run-dir", tmp_path / "r2", *common) == 0
    assert _train("finetune", "--task", "caption", *coco, "--init", tmp_path / "s2", "--out", tmp_path / "cap",
                  "--run-dir", tmp_path / "r3", *common) == 0
    printed = capsys.readouterr().out
    assert "settings:" in printed and "weight_decay=0.05" in printed and "prompt=a photo of" in printed
    settings = json.loads((tmp_path / "cap" / "train_args.json").read_text())
    assert settings["lr"] == 1e-5 and settings["train_vit"] is True and settings["frozen"] == ["language_model."]
    log = [json.loads(line) for line in (tmp_path / "r3" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)
    assert Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "s1").config.num_query_tokens == 4
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "cap")
    # the LLM stayed frozen: the demo's OPT exactly; the ViT was trained by the caption fine-tune
    from safetensors.torch import load_file

    demo = load_file(str(DEMO / "model.safetensors"))
    name = "language_model.model.decoder.layers.0.fc1.weight"
    assert torch.equal(hf.state_dict()[name], demo[name].float())
    vit = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(hf.state_dict()[vit], demo[vit].float())
    s2 = load_file(str(tmp_path / "s2" / "model.safetensors"))
    assert torch.equal(s2[vit], demo[vit].float())  # stage 2 kept it frozen
    from train.blip2.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "cap").has_llm  # what export.build loads


def test_a_killed_run_resumes_to_the_same_weights(files, tmp_path, caplog):
    from train.blip2.checkpoint import load_checkpoint
    from train.training.tasks import Options, run_command

    def args(out, run, data=files / "train" / "train.jsonl"):  # as the command line gives them
        return SimpleNamespace(data=data, images=None, vision=DEMO, qformer_init=files / "bert", num_queries=4,
                               cross_attention_every=2, init=None, out=tmp_path / out, run=tmp_path / run)

    opts = Options(steps=4, batch_size=4, workers=0, log_every=3, save_every=2)
    whole, killed = args("whole", "run-whole"), args("killed", "run-killed")
    run_command("stage1", None, whole, opts)

    class StopAtStep3(logging.Handler):  # Ctrl-C as the third step's line is logged
        def emit(self, record):
            if record.getMessage().startswith("stage1 step 3/"):
                raise KeyboardInterrupt

        def handleError(self, record):  # (let the KeyboardInterrupt through)
            raise

    stop, trainer_log = StopAtStep3(), logging.getLogger("train")
    trainer_log.addHandler(stop)
    level, trainer_log.level = trainer_log.level, logging.INFO
    try:
        with pytest.raises(KeyboardInterrupt):
            run_command("stage1", None, killed, opts)
    finally:
        trainer_log.removeHandler(stop)
        trainer_log.setLevel(level)
    assert not killed.out.exists()  # nothing half-written
    from dataclasses import replace

    from train.training.trainer import RunFolderError

    other = args("other", "run-killed", files / "train" / "other.jsonl")  # the same run folder, other data
    rows = (files / "train" / "train.jsonl").read_text().splitlines()
    other.data.write_text("\n".join(rows[::-1]) + "\n")  # (the same images, another order)
    with pytest.raises(RunFolderError, match=r"holds a run with other settings \(data: .*train.jsonl' -> .*other"):
        run_command("stage1", None, other, opts)
    with pytest.raises(RunFolderError, match="lr: 0.0001 -> 0.0002; steps: 4 -> 6"):  # nor another schedule
        run_command("stage1", None, killed, replace(opts, steps=6, lr=2e-4))
    with caplog.at_level(logging.INFO, logger="train"):
        run_command("stage1", None, killed, replace(opts, workers=0, log_every=1))  # may change
    lines = caplog.messages
    assert any("resuming" in line and "at step 2/4" in line for line in lines)
    a, b = load_checkpoint(whole.out).model.state_dict(), load_checkpoint(killed.out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_connects_a_t5_llm_with_its_prefix_lm_loss(tmp_path):
    from safetensors.torch import load_file

    from train.blip2.random_checkpoint import make_random_checkpoint
    from train.blip2.families import family
    from train.training.sources import stage2_start
    from train.shapescaps.stages import lm_batch

    stage1 = make_random_checkpoint(tmp_path / "s1", "tiny", stage=1)
    t5 = make_random_checkpoint(tmp_path / "t5", "tiny-t5")
    model, tok, qtok = stage2_start(stage1, t5)
    assert model.config.text_config.model_type == "t5" and qtok is not None
    theirs = load_file(str(t5 / "model.safetensors"))
    name = "language_model.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(model.state_dict()[name], theirs[name].float())
    embeds = model.encode_image(torch.zeros(2, 3, model.config.vision_config.image_size,
                                            model.config.vision_config.image_size))
    batch = lm_batch(model, tok, [(None, "a red circle"), ("a blue", "square on the left")])
    loss = family(model.config).stage2_loss(model, model.soft_prompt(model.query_forward(embeds)[0]), batch)
    assert torch.isfinite(loss) and loss.requires_grad


def test_stage2_refuses_an_llm_of_another_width(files, tmp_path):
    from train.blip2.checkpoint import CheckpointError
    from train.blip2.random_checkpoint import make_random_checkpoint
    from train.training.sources import stage2_start

    other = make_random_checkpoint(tmp_path / "wide", "small")  # an OPT wider than the demo's
    with pytest.raises(CheckpointError, match="hidden size .* language projection of .* maps to"):
        stage2_start(DEMO, other)


def test_stage2_refuses_a_tokenizer_larger_than_the_llm_vocabulary(files, tmp_path):
    import shutil

    from train.blip2.checkpoint import CheckpointError
    from train.training.sources import stage2_start
    from train.blip2.tokenizers import build_tokenizer

    llm = tmp_path / "llm"
    shutil.copytree(DEMO, llm)
    vocab = json.loads((DEMO / "config.json").read_text())["text_config"]["vocab_size"]
    build_tokenizer(vocab + 50).save_pretrained(llm)  # another tokenizer, bigger than the LLM's vocabulary
    with pytest.raises(CheckpointError, match="tokens but the LLM's vocabulary has"):
        stage2_start(DEMO, llm)


def test_two_processes_train_one_checkpoint(files, tmp_path):
    """torchrun, 2 processes over gloo: ITC gathers across them, rank 0 alone writes the checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train", "stage1", "--data", str(files / "train" / "train.jsonl"), "--vision", str(DEMO),
           "--qformer-init", str(files / "bert"), "--num-queries", "4", "--out", str(tmp_path / "ddp"),
           "--run-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout.count("wrote ") == 1 and proc.stdout.count("settings:") == 1
            and (tmp_path / "ddp" / "model.safetensors").is_file())
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["processes"] == 2


def test_engine_folders_evaluate_on_files_without_torch(make_engine, files):
    from test_no_torch import BLOCKER

    _, engine = make_engine("stage2text")
    code = BLOCKER + f"""
from train.__main__ import main
code = main(["eval", "--engines", {str(engine)!r}, "--data", {str(files / "val" / "val.jsonl")!r}, "--n", "4",
             "--k", "2", "--out", {str(files / "eval.json")!r}])
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
raise SystemExit(code)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((files / "eval.json").read_text())
    assert set(results["tasks"]) == {"caption", "retrieval", "vqa"}
    assert "CIDEr" in proc.stdout and "i2t R@1" in proc.stdout and "VQAv2 accuracy" in proc.stdout
    r = results["tasks"]["retrieval"]
    assert r["images"] == 4 and r["texts"] > 4 and 0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] == 1.0


def test_retrieval_reranks_with_the_same_itm_as_hugging_face_and_the_pipeline(make_engine, files):
    from train.evaluation.backends import PipelineBackend, TorchBackend

    ck, engine = make_engine("stage2text")
    data = open_dataset(files / "val" / "val.jsonl").only("caption")
    images = [data.load(i) for i in range(3)]
    texts = [data.examples[i].captions[0] for i in (1, 0, 2, 2)]
    rows = [0, 1, 2, 0]
    torch_backend, pipe = TorchBackend(ck), PipelineBackend(engine)
    hf = torch_backend.itm([images[r] for r in rows], texts)  # Blip2ForImageTextRetrieval, as users call it
    feats, embeds = torch_backend.gallery(images)
    np.testing.assert_allclose(torch_backend.gallery_itm(embeds, rows, texts), hf, atol=1e-5)
    pipe_feats, pipe_embeds = pipe.gallery(images)
    np.testing.assert_allclose(pipe.gallery_itm(pipe_embeds, rows, texts), hf, atol=1e-4)
    np.testing.assert_allclose(pipe_feats, feats, atol=1e-4)


# ----------------------------------------------------------------------------- metrics

def test_vqa_accuracy_is_vqav2s():
    from train.evaluation.metrics import vqa_accuracy, vqa_normalise

    assert vqa_normalise("Two dogs.") == "2 dogs" and vqa_normalise("the Red") == "red"
    assert vqa_normalise("dont") == "don't"
    assert vqa_accuracy(["2"], [["two"] * 4 + ["three"] * 6]) == pytest.approx(1.0)
    assert vqa_accuracy(["2"], [["two"] * 3 + ["three"] * 7]) == pytest.approx(0.9)  # (3 x 2/3 + 7 x 1) / 10
    assert vqa_accuracy(["2"], [["2"] * 2 + ["3"] * 8]) == pytest.approx(0.6)  # (8 x 2/3 + 2 x 1/3) / 10
    assert vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 10]) == pytest.approx(0.5)


def test_caption_scores_follow_the_coco_evaluation():
    from pycocoevalcap.bleu.bleu import Bleu

    from train.evaluation.metrics import caption_scores, coco_tokenize

    assert coco_tokenize("A man, riding a horse.") == "a man riding a horse"
    refs = {"1": ["a man riding a horse", "a person on a horse"], "2": ["two red circles", "a pair of red circles"]}
    same = caption_scores({"1": "a man riding a horse", "2": "two red circles"}, refs)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["cider"] > 1.0
    other = caption_scores({"1": "a blue square", "2": "a green triangle"}, refs)
    assert other["bleu4"] < 0.01 and other["cider"] < same["cider"] / 10
    gts = {k: v for k, v in refs.items()}
    assert same["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, {k: [v[0]] for k, v in refs.items()},
                                                                verbose=0)[0][3])


def test_retrieval_recall_counts_any_caption_of_the_image():
    from train.evaluation.metrics import retrieval_recall

    scores = np.array([[0.9, 0.1, 0.8], [0.2, 0.3, 0.95]])  # 2 images, 3 texts
    text_image = np.array([0, 0, 1])
    r = retrieval_recall(scores, text_image, ks=(1, 2))
    assert r["i2t_r1"] == 1.0  # image 0 -> text 0 (its own); image 1 -> text 2 (its own)
    assert r["t2i_r1"] == pytest.approx(2 / 3)  # text 1 -> image 1 (wrong); texts 0 and 2 right
    assert r["t2i_r2"] == 1.0
