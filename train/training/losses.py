"""The BLIP-2 training objectives, as small functions of the model's outputs.

Stage 1 (`stage1_losses`): ITC + ITM + ITG, summed, as in BLIP-2 (LAVIS blip2_qformer.py):
  ITC  image query features vs the text [CLS] feature, max over queries, learnable temperature,
       cross-entropy in both directions; negatives from every process (`gather`).
  ITM  positives plus hard negatives drawn from the ITC similarities (a negative text for every
       image and a negative image for every text), two-class head averaged over the queries.
  ITG  the Q-Former's text decoder: [DEC] replaces [CLS], next-token loss through the causal mask.
Stage 2 (`lm_loss`): the LLM's loss on the answer/caption tokens after the soft prompt (`train.blip2.families`).

Foils (optional): for some rows, a minimally changed false caption (ShapesCaps mirrors the layout:
"to the left of" -> "to the right of"). Random in-batch negatives almost never differ from the positive
only in where things are, so without foils nothing asks the queries to bind a position to a shape
(measured: ITM could not tell a caption from its mirror, 0.51). Each foil is an extra ITM negative for
its own image, and `foil_itc_loss` contrasts it with the true caption at the ITC temperature.

`same` ([B, B*W] bool, optional) marks pairs whose texts describe the image equally well (synthetic
data repeats scenes; COCO gives several captions per image): they count as positives for ITC and
are never drawn as ITM negatives.

    from train.training.losses import stage1_losses
    losses = stage1_losses(model, image_embeds, ids, mask, same=None)   # {"itc":, "itm":, "itg":, "loss":}
    losses = stage1_losses(model, image_embeds, ids, mask, foils=(has_foil, foil_ids, foil_mask))  # + "itc_foil"
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.blip2.families import family

LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the ITC and ITG targets


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice (an all-reduce,
    which every backend has; torch.distributed.nn's all_gather backward relies on all_to_all, which
    gives wrong gradients on gloo/CPU)."""

    @staticmethod
    def forward(ctx, x):
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0, keeping gradients to every process's slice
    (so W processes with batch B give exactly the loss and gradients of one process with batch W*B)."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x)


def itc_logits(image_feats, text_feat, image_feats_all, text_feat_all, temp):
    """image_feats [B,Nq,D], text_feat [B,D] (local), *_all gathered -> (i2t [B, B*W], t2i [B, B*W])."""
    i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feat_all).amax(-1) / temp
    t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).amax(-1) / temp
    return i2t, t2i


def _targets(batch: int, rank: int, width: int, same, device) -> torch.Tensor:
    """Soft targets [B, B*W]: uniform over the positives of each row (its own pair plus `same`)."""
    target = torch.zeros(batch, width, device=device)
    target[torch.arange(batch), rank * batch + torch.arange(batch)] = 1.0
    if same is not None:
        target = torch.maximum(target, same.float())
    return target / target.sum(1, keepdim=True)


def itc_loss(i2t, t2i, same=None, label_smoothing: float = LABEL_SMOOTHING):
    rank, _ = world()
    target = _targets(i2t.shape[0], rank, i2t.shape[1], same, i2t.device)
    return (F.cross_entropy(i2t, target, label_smoothing=label_smoothing)
            + F.cross_entropy(t2i, target, label_smoothing=label_smoothing)) / 2


def foil_itc_loss(image_feats, text_feat, foil_feat, has_foil, temp):
    """Each image with a foil: 2-way cross-entropy between its caption (class 0) and its foil, on the ITC
    similarity (max over queries) / temp. image_feats [B,Nq,D], text_feat [B,D], foil_feat [F,D], has_foil [B]."""
    feats = image_feats[has_foil]  # [F, Nq, D]
    pos = torch.einsum("fqd,fd->fq", feats, text_feat[has_foil]).amax(-1)
    neg = torch.einsum("fqd,fd->fq", feats, foil_feat).amax(-1)
    logits = torch.stack([pos, neg], 1) / temp  # [F, 2]
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _pad(ids: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(ids, (0, width - ids.shape[1]))


def hard_negatives(sim: torch.Tensor, same=None, generator=None) -> torch.Tensor:
    """One negative per row, drawn with probability softmax(sim) over the local candidates [B, B];
    the positive (diagonal) and anything in `same` get probability 0. A row with no candidate left
    draws uniformly among the others."""
    with torch.no_grad():
        batch = sim.shape[0]
        blocked = torch.eye(batch, dtype=torch.bool, device=sim.device)
        if same is not None:
            blocked |= same
        weights = sim.float().masked_fill(blocked, float("-inf")).softmax(1)
        empty = ~torch.isfinite(weights).all(1) | (weights.sum(1) == 0)
        if empty.any():
            fallback = (~torch.eye(batch, dtype=torch.bool, device=sim.device)).float()
            weights[empty] = fallback[empty] / max(batch - 1, 1)
        if batch == 1:
            return torch.zeros(1, dtype=torch.long, device=sim.device)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(model, image_embeds, ids, mask, i2t, t2i, same=None, generator=None, foils=None):
    """Positives + a hard negative image per text + a hard negative text per image (+ each image with its
    foil, when `foils` = (has_foil [B], foil_ids [F,T'], foil_mask [F,T']) is given) -> 2-class CE."""
    rank, _ = world()
    batch = ids.shape[0]
    local = slice(rank * batch, (rank + 1) * batch)
    local_same = same[:, local] if same is not None else None
    neg_image = hard_negatives(t2i[:, local], local_same, generator)  # for each text, an image
    neg_text = hard_negatives(i2t[:, local], local_same, generator)  # for each image, a text
    embeds = [image_embeds, image_embeds[neg_image], image_embeds]  # 3 x [B, Np, Dv]
    text_ids, text_mask = [ids, ids, ids[neg_text]], [mask, mask, mask[neg_text]]
    if foils is not None:
        has_foil, foil_ids, foil_mask = foils
        embeds.append(image_embeds[has_foil])
        text_ids.append(foil_ids)
        text_mask.append(foil_mask)
    width = max(t.shape[1] for t in text_ids)
    text_ids = torch.cat([_pad(t, width) for t in text_ids])
    text_mask = torch.cat([_pad(m, width) for m in text_mask])
    logits, _ = model.itm_forward(torch.cat(embeds), text_ids, text_mask)  # [3B (+F), 2]
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    labels[:batch] = 1
    return F.cross_entropy(logits, labels)


def itg_loss(model, image_embeds, ids, mask, label_smoothing: float = LABEL_SMOOTHING):
    """ids start with [CLS]; it is replaced by [DEC] and every later token is predicted from the ones before."""
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.edge.dec_token_id
    logits = model.itg_logits(image_embeds, dec_ids, mask)  # [B, T, V]
    labels = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, label_smoothing=label_smoothing)


def stage1_losses(model, image_embeds, ids, mask, same=None, generator=None, foils=None) -> dict:
    """image_embeds [B,Np,Dv] (frozen ViT), ids/mask [B,T] Q-Former tokens ([CLS] ... [SEP]).
    same: [B, B*W] bool or None; foils: (has_foil [B] bool, foil_ids [F,T'], foil_mask [F,T']) or None
    (see the module docstring)."""
    query_output, _ = model.query_forward(image_embeds)
    image_feats = model.image_feats(query_output)  # [B, Nq, D]
    text_feat = model.text_feat(ids, mask)  # [B, D]
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    i2t, t2i = itc_logits(image_feats, text_feat, gather(image_feats), gather(text_feat), model.temp)
    losses = {
        "itc": itc_loss(i2t, t2i, same),
        "itm": itm_loss(model, image_embeds, ids, mask, i2t.detach(), t2i.detach(), same, generator, foils),
        "itg": itg_loss(model, image_embeds, ids, mask),
    }
    if foils is not None:
        has_foil, foil_ids, foil_mask = foils
        losses["itc_foil"] = foil_itc_loss(image_feats, text_feat, model.text_feat(foil_ids, foil_mask), has_foil,
                                           model.temp)
    losses["loss"] = sum(losses.values())
    return losses


def lm_loss(model, image_embeds, batch: dict):
    """Stage 2: the soft prompt of each image through the frozen LLM, the loss on the target tokens only (the
    family's: OPT's language-modelling loss after the prompt, T5's prefix-LM loss on the suffix; `batch` from
    `train.blip2.families.family(config).stage2_batch`)."""
    query_output, _ = model.query_forward(image_embeds)
    return family(model.config).stage2_loss(model, model.soft_prompt(query_output), batch)
