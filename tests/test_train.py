"""Training: each loss against a direct computation from its formula, hard negatives, the
multi-process ITC gather, resume after a kill, the NaN guard, and checkpoints that load in HF."""
import logging
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.training import losses as L
from train.blip2.model import Blip2Edge, EdgeConfig
from train.blip2.presets import blip2_config
from train.training.trainer import NonFiniteLoss, TrainConfig, fit, lr_at


@pytest.fixture(scope="module")
def model():
    cfg = blip2_config("tiny", qformer_vocab_size=64, vocab_size=300)  # byte-level BPE: >= 256 ids
    torch.manual_seed(0)
    return Blip2Edge(cfg, EdgeConfig(stage=2, qformer_text=True, itg_head=True)).eval()


def _text(batch=4, length=6, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return ids, mask


# ---------------------------------------------------------------- losses vs their formulas
def test_itc_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    i2t, t2i = L.itc_logits(img, txt, img, txt, temp)
    # direct: s(i, t) = max_q <img[i, q], txt[t]> / temp; CE with smoothing eps over B classes, both directions
    s = torch.tensor([[max(float(img[i, q] @ txt[t]) for q in range(4)) for t in range(3)] for i in range(3)]) / 0.07
    assert torch.allclose(i2t, s, atol=1e-5) and torch.allclose(t2i, s.T, atol=1e-5)
    eps = L.LABEL_SMOOTHING

    def ce(logits):
        logp = logits.log_softmax(1)
        return float(sum(-(1 - eps) * logp[i, i] - eps / 3 * logp[i].sum() for i in range(3)) / 3)

    assert math.isclose(float(L.itc_loss(i2t, t2i)), (ce(s) + ce(s.T)) / 2, rel_tol=1e-5)
    # an equivalent pair ("same") shares the target mass
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[0, 1] = True
    target = L._targets(3, 0, 3, same, "cpu")
    assert target[0].tolist() == [0.5, 0.5, 0.0] and target[1].tolist() == [0.0, 1.0, 0.0]


def test_hard_negatives_never_pick_the_positive_or_an_equivalent():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 5
    sim.fill_diagonal_(100.0)  # the positive is by far the most similar
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[2, 3] = True
    for _ in range(200):
        neg = L.hard_negatives(sim, same, g)
        assert (neg != torch.arange(6)).all()
        assert neg[2] != 3
    # harder negatives are drawn more often: row 0's most similar non-positive dominates
    sim2 = torch.zeros(4, 4)
    sim2[0, 1] = 10.0
    counts = np.bincount([int(L.hard_negatives(sim2, None, g)[0]) for _ in range(300)], minlength=4)
    assert counts[1] > 250 and counts[0] == 0
    # a row whose candidates are all blocked falls back to any other row
    all_same = ~torch.eye(3, dtype=torch.bool)
    assert (L.hard_negatives(torch.zeros(3, 3), all_same, g) != torch.arange(3)).all()


@torch.no_grad()
def test_itg_loss_matches_the_formula(model):
    image_embeds = model.encode_image(torch.randn(4, 3, 32, 32))
    ids, mask = _text()
    loss = L.itg_loss(model, image_embeds, ids, mask, label_smoothing=0.0)
    dec = ids.clone()
    dec[:, 0] = model.edge.dec_token_id
    logits = model.itg_logits(image_embeds, dec, mask)
    terms = [-logits[b, t].log_softmax(-1)[dec[b, t + 1]] for b in range(4) for t in range(5) if mask[b, t + 1]]
    assert math.isclose(float(loss), float(sum(terms) / len(terms)), rel_tol=1e-5)


@torch.no_grad()
def test_itm_loss_uses_positives_and_both_kinds_of_negatives(model, monkeypatch):
    image_embeds = model.encode_image(torch.randn(4, 3, 32, 32))
    ids, mask = _text()
    seen = {}
    real = model.itm_forward

    def spy(embeds, text_ids, text_mask):
        seen["embeds"], seen["ids"] = embeds, text_ids
        return real(embeds, text_ids, text_mask)

    monkeypatch.setattr(model, "itm_forward", spy)
    sim = torch.randn(4, 4)
    loss = L.itm_loss(model, image_embeds, ids, mask, sim, sim.T, None, torch.Generator().manual_seed(0))
    assert seen["embeds"].shape[0] == 12 and torch.equal(seen["ids"][:4], ids) and torch.equal(seen["ids"][4:8], ids)
    for b in range(4):  # row b+4: text b with another image; row b+8: image b with another text
        assert not torch.equal(seen["embeds"][4 + b], image_embeds[b])
        assert not torch.equal(seen["ids"][8 + b], ids[b])
    logits, _ = real(seen["embeds"], seen["ids"], torch.cat([mask, mask, mask[[0] * 4]]))
    assert float(loss) > 0 and logits.shape == (12, 2)


@torch.no_grad()
def test_foils_are_extra_itm_negatives_of_their_own_image(model, monkeypatch):
    image_embeds = model.encode_image(torch.randn(4, 3, 32, 32))
    ids, mask = _text()
    foil_ids, foil_mask = _text(batch=2, length=8, seed=1)  # wider than ids: the batch is padded
    has_foil = torch.tensor([True, False, True, False])
    seen = {}
    real = model.itm_forward

    def spy(embeds, text_ids, text_mask):
        seen.update(embeds=embeds, ids=text_ids, mask=text_mask)
        return real(embeds, text_ids, text_mask)

    monkeypatch.setattr(model, "itm_forward", spy)
    sim = torch.randn(4, 4)
    L.itm_loss(model, image_embeds, ids, mask, sim, sim.T, None, torch.Generator().manual_seed(0),
               foils=(has_foil, foil_ids, foil_mask))
    assert seen["embeds"].shape[0] == 14 and seen["ids"].shape == (14, 8)
    assert torch.equal(seen["embeds"][12], image_embeds[0]) and torch.equal(seen["embeds"][13], image_embeds[2])
    assert torch.equal(seen["ids"][12:], foil_ids) and torch.equal(seen["ids"][:4, :6], ids)
    assert not seen["mask"][:12, 6:].any()  # padding added to the shorter texts is masked out


def test_foil_itc_loss_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    foil = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    has = torch.tensor([True, False, True])
    loss = L.foil_itc_loss(img, txt, foil, has, torch.tensor(0.1))
    terms = []
    for f, i in enumerate([0, 2]):  # -log softmax([s(i, caption i), s(i, foil)])[0], s = max over queries / temp
        pos, neg = float((img[i] @ txt[i]).max()) / 0.1, float((img[i] @ foil[f]).max()) / 0.1
        terms.append(-pos + math.log(math.exp(pos) + math.exp(neg)))
    assert math.isclose(float(loss), sum(terms) / 2, rel_tol=1e-5)


@torch.no_grad()
def test_lm_loss_counts_only_target_tokens(model):
    from train.shapescaps.stages import lm_batch
    from train.blip2.tokenizers import build_tokenizer

    tok = build_tokenizer(270)
    batch = lm_batch(model, tok, [("Question: what? Answer:", "red"), (None, "a red circle")])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    nq = model.config.num_query_tokens
    assert (ids[:, :nq] == model.config.image_token_index).all() and (labels[:, :nq] == -100).all()
    target0 = tok(" red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert labels[0][labels[0] != -100].tolist() == target0
    assert labels[1][labels[1] != -100].tolist() == tok("a red circle", add_special_tokens=False).input_ids + [2]
    image_embeds = model.encode_image(torch.randn(2, 3, 32, 32))
    loss = L.lm_loss(model, image_embeds, batch)
    # direct: embeddings with the soft prompt in place, next-token NLL over labelled positions
    prompt = model.soft_prompt(model.query_forward(image_embeds)[0])
    emb = model.language_model.get_input_embeddings()(ids)
    emb[:, :nq] = prompt
    logits = model.language_model(inputs_embeds=emb, attention_mask=mask).logits
    terms = [-logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b in range(2) for t in range(ids.shape[1] - 1)
             if labels[b, t + 1] != -100]
    assert math.isclose(float(loss), float(sum(terms) / len(terms)), rel_tol=1e-5)


# ---------------------------------------------------------------- ITC across processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _itc_worker(rank, world_size, port, img, txt, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    batch = img.shape[0] // world_size
    mine = slice(rank * batch, (rank + 1) * batch)
    local_img, local_txt = img[mine].clone().requires_grad_(True), txt[mine].clone().requires_grad_(True)
    i2t, t2i = L.itc_logits(local_img, local_txt, L.gather(local_img), L.gather(local_txt), torch.tensor(0.1))
    loss = L.itc_loss(i2t, t2i)
    loss.backward()
    out[rank] = (float(loss.detach()), local_img.grad.clone(), local_txt.grad.clone(), tuple(i2t.shape))
    dist.destroy_process_group()


def test_itc_negatives_come_from_every_process():
    """2 processes x batch 3 give the loss and gradients of one process with batch 6."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_itc_worker, args=(2, _free_port(), img, txt, out), nprocs=2, join=True)
    ref_img, ref_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    i2t, t2i = L.itc_logits(ref_img, ref_txt, ref_img, ref_txt, torch.tensor(0.1))
    ref = L.itc_loss(i2t, t2i)
    ref.backward()
    assert out[0][3] == (3, 6), "each process scores its 3 images against all 6 texts"
    assert math.isclose((out[0][0] + out[1][0]) / 2, float(ref.detach()), rel_tol=1e-5)
    # the all-gather backward sums every process's loss gradient into each slice; averaging the parameter
    # gradients over the processes (as the trainer does) then equals the single-process gradient
    grad_img = torch.cat([out[0][1], out[1][1]]) / 2
    grad_txt = torch.cat([out[0][2], out[1][2]]) / 2
    assert torch.allclose(grad_img, ref_img.grad, atol=1e-6) and torch.allclose(grad_txt, ref_txt.grad, atol=1e-6)


# ---------------------------------------------------------------- the loop: resume, NaN guard
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.5)

    def objective(self, step, generator):
        x = torch.randn(8, 4, generator=generator)
        return {"loss": (self.drop(self.lin(x)) - 1).pow(2).mean()}


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=8, lr=0.05, warmup=2, save_every=3, log_every=100)
    straight = _Toy()
    fit("toy", straight, straight.parameters(), straight.objective, cfg, tmp_path / "a.state")

    killed = _Toy()

    def dies_at_5(step, generator):
        if step == 5:
            raise KeyboardInterrupt  # the process is killed during step 5
        return killed.objective(step, generator)

    with pytest.raises(KeyboardInterrupt):
        fit("toy", killed, killed.parameters(), dies_at_5, cfg, tmp_path / "b.state")
    assert torch.load(tmp_path / "b.state", weights_only=True)["step"] == 3
    resumed = _Toy()  # a fresh process
    ran = fit("toy", resumed, resumed.parameters(), resumed.objective, cfg, tmp_path / "b.state")
    assert ran == 5
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_nan_guard_stops_and_keeps_the_last_good_state(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, lr=0.05, warmup=1, save_every=2, log_every=100)
    toy = _Toy()

    def goes_nan(step, generator):
        losses = toy.objective(step, generator)
        return {"loss": losses["loss"] * (float("nan") if step == 5 else 1.0)}

    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 5.*last good state is .*c.state \(step 4\)"):
        fit("toy", toy, toy.parameters(), goes_nan, cfg, tmp_path / "c.state")
    state = torch.load(tmp_path / "c.state", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["module"].values())


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


# ---------------------------------------------------------------- stages and checkpoints
def test_stage1_and_stage2_learn_and_save_hf_loadable_checkpoints(tmp_path, caplog):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from train.blip2.random_checkpoint import write_checkpoint
    from train.blip2.checkpoint import preprocessor
    from train.shapescaps.recipe import Recipe, build_model, build_tokenizers
    from train.shapescaps.stages import run_stage1, run_stage2, shapescaps_set

    recipe = Recipe(preset="tiny", corpus_texts=300, llm_vocab=200, qformer_vocab=150)
    tok, qtok = build_tokenizers(recipe)
    model = build_model(recipe, tok, qtok)
    data = shapescaps_set(model.vision_model, preprocessor(model), 64, 32)
    cfg = TrainConfig(steps=12, batch_size=16, lr=2e-3, warmup=2, log_every=1, save_every=100)
    with caplog.at_level(logging.INFO, logger="train"):
        run_stage1(model, data, qtok, cfg, tmp_path / "s1.state")
    log = list(caplog.messages)
    first, last = log[0], log[-1]
    itg = lambda line: float(line.split(" itg ")[1].split()[0])  # noqa: E731
    assert itg(last) < itg(first), (first, last)
    vision_before = model.vision_model.embeddings.patch_embedding.weight.clone()
    lm_before = model.language_model.lm_head.weight.clone()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        run_stage2(model, data, tok, qtok, cfg, tmp_path / "s2.state")
    log = list(caplog.messages)
    lm = lambda line: float(line.split(" lm ")[1].split()[0])  # noqa: E731
    assert lm(log[-1]) < lm(log[0])
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, vision_before)  # frozen
    assert torch.equal(model.language_model.lm_head.weight, lm_before)  # frozen
    s1 = write_checkpoint(model, tmp_path / "stage1", None, qtok, stage=1)
    s2 = write_checkpoint(model, tmp_path / "stage2", tok, qtok, stage=2)
    assert not list(tmp_path.glob(".stage*"))  # no temporary folder left behind
    hf1 = Blip2ForImageTextRetrieval.from_pretrained(s1)
    hf2 = Blip2ForConditionalGeneration.from_pretrained(s2)
    assert torch.equal(hf1.itm_head.weight, model.itm_head.weight)
    assert torch.equal(hf2.language_projection.weight, model.language_projection.weight)
    again = Blip2Edge.from_pretrained(s2)
    assert torch.equal(again.itg_head.decoder.weight, model.itg_head.decoder.weight)
    assert float(again.temp.detach()) == float(model.temp.detach())


@pytest.mark.slow  # (35 s: the default suite's time)
def test_demo_recipe_runs_end_to_end_quick(tmp_path):
    """`python -m train demo --quick` goes through every phase and writes an evaluated, loadable checkpoint."""
    import json
    import subprocess
    import sys

    out, run = tmp_path / "demo", tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "demo", "--quick", "--out", str(out), "--run", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for phase in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert phase in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report["metrics"]) == {"caption_accuracy", "itc_r1_i2t", "itc_r1_t2i", "itm_accuracy", "vqa_accuracy"}
    assert report["folder"] == str(out)  # the folder's final name, not the temporary one it was evaluated in
    assert (run / "stage1" / "blip2_edge.json").is_file() and (out / "qformer_tokenizer").is_dir()
    model = Blip2Edge.from_pretrained(out)
    assert model.edge.stage == 2 and hasattr(model, "itg_head") and hasattr(model, "language_model")
    # a second run resumes every phase from its saved state and trains nothing more
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("resuming from") == 4


def test_a_run_folder_resumes_only_the_run_that_wrote_it(tmp_path):
    """check_resume (train demo's recipe.json, the commands' train_args.json): settings that differ from the saved
    run's are refused, naming them, once there is training state to resume; the same settings, or keys allowed to
    change, or no state yet, go on."""
    import json

    from train.training.trainer import RunFolderError, check_resume

    saved = {"preset": "demo", "stage1_steps": 1500, "seed": 0, "workers": 2}
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    check_resume(tmp_path, {**saved, "preset": "demo-t5"}, "recipe.json")  # no state yet: a fresh start
    (tmp_path / "stage1.state").write_bytes(b"")
    check_resume(tmp_path, dict(saved), "recipe.json")
    check_resume(tmp_path, {**saved, "workers": 4}, "recipe.json", may_change={"workers"})
    with pytest.raises(RunFolderError, match=r"preset: 'demo' -> 'demo-t5'; stage1_steps: 1500 -> 5\), which this "
                                             r"command would resume; give another run folder \(--run NEW\)"):
        check_resume(tmp_path, {**saved, "preset": "demo-t5", "stage1_steps": 5}, "recipe.json", flag="--run")
