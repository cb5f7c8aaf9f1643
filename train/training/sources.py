"""Where a user's training starts: BLIP-2 models assembled from pretrained parts, every size check up front.

    from train.training.sources import stage1_start, stage2_start, finetune_start
    model, qtok = stage1_start(init="models/demo")                               # reuse a BLIP-2's ViT + Q-Former
    model, qtok = stage1_start(vision="models/demo", qformer_init="bert-dir/")   # ViT of one, BERT for the Q-Former
    model, tok, qtok = stage2_start("runs/stage1", llm="models/demo")             # + a frozen LLM, new projection
    model, tok, qtok = finetune_start("checkpoints/stage2")                       # any checkpoint of ours or HF's

Sources are folders (or Hugging Face hub ids, resolved through the local cache as export does):

* a BLIP-2 checkpoint (`save_pretrained` of Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval, ours
  or Salesforce's): its ViT and Q-Former, its LLM when one is asked for;
* `--vision`: a BLIP-2 checkpoint or a `Blip2VisionModel` folder; only the vision tower is read;
* `--qformer-init`: a BERT-style folder (BertModel / BertForMaskedLM with its WordPiece tokenizer). As BLIP-2
  does, its embeddings, self-attention and feed-forward weights initialise the Q-Former's (the query
  feed-forward too), the cross-attention layers (every `--cross-attention-every` layers) start random, and
  `[DEC]` is added to its tokenizer for ITG;
* `--llm`: a BLIP-2 checkpoint (its LLM and tokenizer) or an OPT / T5 folder with its tokenizer; an `<image>`
  placeholder token is added to the tokenizer (and a row to the frozen embeddings) when it has none.

Only the tensors wanted are read from the safetensors files (a 7B LLM is not loaded to take a ViT).
"""
import json
import logging
from pathlib import Path

import torch

from train.blip2.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, resolve_source
from train.blip2.families import family
from train.blip2.model import EDGE_WEIGHTS, Blip2Edge, EdgeConfig
from train.blip2.tokenizers import IMAGE_TOKEN

logger = logging.getLogger(__name__)


def _folder(source, what: str) -> Path:
    path = resolve_source(source)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} {source}: no config.json there; pass a folder written by save_pretrained")
    return path


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """{name without prefix: tensor} of every safetensors tensor of `path` whose name starts with `prefix`."""
    from safetensors import safe_open

    files = sorted(f for f in path.glob("*.safetensors") if f.name != EDGE_WEIGHTS)
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights; re-save it with save_pretrained "
                              f"(safe_serialization=True)")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = h.get_tensor(k).float()
    return out


# ----------------------------------------------------------------------------- vision

def vision_part(source) -> tuple[dict, dict[str, torch.Tensor]]:
    """(vision config dict, vision_model weights) of a BLIP-2 checkpoint or a Blip2VisionModel folder."""
    path = _folder(source, "--vision")
    cfg = _config(path)
    if cfg.get("model_type") == "blip-2":
        return cfg["vision_config"], read_tensors(path, "vision_model.")
    if cfg.get("model_type") == "blip_2_vision_model":
        weights = read_tensors(path, "")
        return cfg, {k.removeprefix("vision_model."): v for k, v in weights.items()}
    raise CheckpointError(f"--vision {source} holds a {cfg.get('model_type')!r} model; pass a BLIP-2 checkpoint or a "
                          f"Blip2VisionModel folder (model_type 'blip-2' or 'blip_2_vision_model')")


# ----------------------------------------------------------------------------- Q-Former from BERT

def _bert_to_qformer(name: str) -> list[str]:
    """Q-Former parameter names a BERT parameter initialises (BLIP-2's init: the FFN feeds both branches)."""
    name = name.removeprefix("bert.")
    if name.startswith("embeddings."):
        return {"embeddings.word_embeddings.weight": ["embeddings.word_embeddings.weight"],
                "embeddings.position_embeddings.weight": ["embeddings.position_embeddings.weight"],
                "embeddings.LayerNorm.weight": ["qformer.layernorm.weight"],
                "embeddings.LayerNorm.bias": ["qformer.layernorm.bias"]}.get(name, [])
    if not name.startswith("encoder.layer."):
        return []
    q = "qformer." + name.replace(".attention.self.", ".attention.attention.")
    if ".intermediate." in q:
        return [q, q.replace(".intermediate.", ".intermediate_query.")]
    if ".output." in q and ".attention." not in q:
        return [q, q.replace(".output.", ".output_query.")]
    return [q]


def qformer_from_bert(model: Blip2Edge, bert: dict[str, torch.Tensor]) -> list[str]:
    """Copy BERT's weights into the model's Q-Former; returns the Q-Former names initialised."""
    own = model.state_dict()
    done = []
    for name, value in bert.items():
        for target in _bert_to_qformer(name):
            if target not in own:
                continue
            dst = own[target]
            rows = min(dst.shape[0], value.shape[0])  # the vocabulary grew by [DEC]; positions may be fewer
            if dst.shape[1:] != value.shape[1:]:
                raise CheckpointError(f"--qformer-init {name} has shape {tuple(value.shape)}, the Q-Former's {target} "
                                      f"{tuple(dst.shape)}")
            with torch.no_grad():
                dst[:rows].copy_(value[:rows])
            done.append(target)
    return done


def bert_qformer_config(bert_cfg: dict, vision_width: int, vocab_size: int, cross_attention_every: int):
    from transformers import Blip2QFormerConfig

    if bert_cfg.get("model_type") != "bert":
        raise CheckpointError(f"--qformer-init holds a {bert_cfg.get('model_type')!r} model; pass a BERT-style "
                              f"folder (model_type 'bert', e.g. bert-base-uncased as BLIP-2 uses)")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "initializer_range", "pad_token_id")
    return Blip2QFormerConfig(**{k: bert_cfg[k] for k in keys if k in bert_cfg}, vocab_size=vocab_size,
                              encoder_hidden_size=vision_width, cross_attention_frequency=cross_attention_every,
                              use_qformer_text_input=True)


def _with_dec(tokenizer):
    """The BERT tokenizer with BLIP-2's [DEC] token (ITG's first token) added when missing."""
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[DEC]"]})
    for token in ("cls_token", "sep_token", "pad_token"):
        if getattr(tokenizer, token) is None:
            raise CheckpointError(f"the --qformer-init tokenizer has no {token.replace('_token', '')} token; BLIP-2 "
                                  f"needs a BERT-style tokenizer with [CLS], [SEP] and [PAD]")
    return tokenizer


def _ids(qtok) -> dict:
    return {"cls_token_id": qtok.cls_token_id, "sep_token_id": qtok.sep_token_id, "pad_token_id": qtok.pad_token_id,
            "dec_token_id": qtok.convert_tokens_to_ids("[DEC]")}


# ----------------------------------------------------------------------------- stage 1

def stage1_start(init=None, vision=None, qformer_init=None, num_queries: int = 32,
                 cross_attention_every: int = 2) -> tuple[Blip2Edge, object]:
    """A stage-1 model (Q-Former with ITC/ITM/ITG heads, no LLM) and its Q-Former tokenizer."""
    if init is not None:
        if vision is not None or qformer_init is not None:
            raise CheckpointError("pass either --init (a BLIP-2 checkpoint: its ViT and Q-Former) or --vision with "
                                  "--qformer-init, not both")
        return _stage1_from_checkpoint(init)
    if vision is None or qformer_init is None:
        raise CheckpointError("stage 1 starts from --init CHECKPOINT (a BLIP-2 folder or hub id) or from --vision DIR "
                              "(a BLIP-2 or Blip2VisionModel folder) with --qformer-init DIR (a BERT-style folder)")
    return _stage1_from_parts(vision, qformer_init, num_queries, cross_attention_every)


def _stage1_from_checkpoint(source) -> tuple[Blip2Edge, object]:
    ck = load_checkpoint(source)
    if ck.qformer_tokenizer is None or not hasattr(ck.model, "text_projection"):
        raise CheckpointError(f"{source} has no Q-Former text side (a stage-2 checkpoint trained without it, like "
                              f"Salesforce/blip2-opt-2.7b); start stage 1 from --vision {source} --qformer-init "
                              f"BERT_DIR instead")
    model = _restage(ck.model, stage=1)
    logger.info(f"stage 1 from {ck.path}: its ViT, Q-Former and text side")
    return model, ck.qformer_tokenizer


def _restage(model: Blip2Edge, stage: int, text_config=None, image_token_index=None) -> Blip2Edge:
    """A model of `stage` holding `model`'s ViT, Q-Former, text side and heads (new parts random)."""
    import copy

    from transformers import Blip2Config

    config = copy.deepcopy(model.config)
    if text_config is not None:  # a new config: it picks the LLM class (decoder-only or encoder-decoder) from it
        c = model.config
        config = Blip2Config(vision_config=c.vision_config.to_dict(), qformer_config=c.qformer_config.to_dict(),
                             text_config=text_config.to_dict(), num_query_tokens=c.num_query_tokens,
                             image_text_hidden_size=c.image_text_hidden_size)
    config.image_token_index = image_token_index if stage == 2 else None
    edge = EdgeConfig(**{**model.edge.__dict__, "stage": stage, "qformer_text": True, "itg_head": True})
    new = Blip2Edge(config, edge)
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith(("language_model.", "language_projection."))}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    assert not unexpected, unexpected
    return new


def _stage1_from_parts(vision, qformer_init, num_queries, cross_attention_every) -> tuple[Blip2Edge, object]:
    from transformers import Blip2Config

    vision_cfg, vision_weights = vision_part(vision)
    bert_path = _folder(qformer_init, "--qformer-init")
    qtok = _with_dec(load_tokenizer(bert_path, "--qformer-init"))
    qcfg = bert_qformer_config(_config(bert_path), vision_cfg["hidden_size"], len(qtok), cross_attention_every)
    config = Blip2Config(vision_config=vision_cfg, qformer_config=qcfg.to_dict(), num_query_tokens=num_queries)
    config.image_token_index = None
    model = Blip2Edge(config, EdgeConfig(stage=1, qformer_text=True, itg_head=True,
                                         max_text_tokens=min(qcfg.max_position_embeddings, 512), **_ids(qtok)))
    missing, unexpected = model.vision_model.load_state_dict(vision_weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--vision {vision}: its vision weights do not fit its config (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    done = qformer_from_bert(model, read_tensors(bert_path, ""))
    if not any("attention.attention.query" in n for n in done):
        raise CheckpointError(f"--qformer-init {qformer_init}: no BERT encoder weights found (expected names like "
                              f"encoder.layer.0.attention.self.query.weight)")
    logger.info(f"stage 1 from the ViT of {vision} and a Q-Former initialised from {qformer_init} "
                f"({len(done)} tensors; cross-attention every {cross_attention_every} layers and {num_queries} "
                f"queries new)")
    return model, qtok


# ----------------------------------------------------------------------------- stage 2

def llm_part(source):
    """(text config, language_model weights, tokenizer) of a BLIP-2 checkpoint or an OPT / T5 folder."""
    from transformers import AutoConfig

    path = _folder(source, "--llm")
    cfg = _config(path)
    tok = load_tokenizer(path, "--llm")
    if cfg.get("model_type") == "blip-2":
        text = AutoConfig.for_model(**cfg["text_config"])
        return text, read_tensors(path, "language_model."), tok
    if cfg.get("model_type") in ("opt", "t5"):
        return AutoConfig.from_pretrained(path), read_tensors(path, ""), tok
    raise CheckpointError(f"--llm {source} holds a {cfg.get('model_type')!r} model; pass an OPT or T5 folder (or a "
                          f"BLIP-2 checkpoint, whose LLM is taken)")


def stage2_start(init, llm):
    """A stage-2 model: `init`'s ViT, Q-Former (and text side), the LLM of `llm`, a new language projection
    (kept when `init` is a stage-2 checkpoint whose projection fits the LLM). Returns (model, tokenizer, qtok)."""
    ck = load_checkpoint(init)
    text, weights, tok = llm_part(llm)
    if ck.has_llm and ck.model.language_projection.out_features != text.hidden_size:
        raise CheckpointError(f"--llm {llm} has hidden size {text.hidden_size} but the language projection of "
                              f"{init} maps to {ck.model.language_projection.out_features}: pass an LLM of the "
                              f"checkpoint's width, or a stage-1 checkpoint as --init (its projection starts new)")
    if ck.qformer_tokenizer is None:
        raise CheckpointError(f"{init} has no Q-Former tokenizer; run stage 1 first (python -m train stage1)")
    if len(tok) > text.vocab_size:
        raise CheckpointError(f"--llm {llm}: its tokenizer has {len(tok)} tokens but the LLM's vocabulary has "
                              f"{text.vocab_size}: they do not belong together; save the LLM's own tokenizer beside it")
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    model = _restage(ck.model, stage=2, text_config=text, image_token_index=image_token)
    lm = model.language_model
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    family(model.config).retie(lm)  # an LM head tied to the embeddings where the config ties them
    loaded = {t.data_ptr() for k, t in lm.state_dict().items() if k in weights}
    untouched = [k for k in missing if lm.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untouched:
        raise CheckpointError(f"--llm {llm}: its weights do not fit its config (missing {untouched[:3]}, unexpected "
                              f"{unexpected[:3]})")
    if len(tok) > text.vocab_size:
        model.language_model.resize_token_embeddings(len(tok))
        model.config.text_config.vocab_size = len(tok)
    if ck.has_llm:
        model.language_projection.load_state_dict(ck.model.language_projection.state_dict())
    logger.info(f"stage 2 from {ck.path} with the frozen {text.model_type.upper()} of {llm} "
                f"({sum(p.numel() for p in model.language_model.parameters()) / 1e6:.1f}M parameters)")
    return model, tok, ck.qformer_tokenizer


def finetune_start(init):
    """(model, LLM tokenizer or None, Q-Former tokenizer) of a checkpoint, as it is."""
    ck = load_checkpoint(init)
    return ck.model, ck.tokenizer, ck.qformer_tokenizer
