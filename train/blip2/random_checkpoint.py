"""Make a randomly initialised BLIP-2 checkpoint folder from a preset: for tests, benchmarks and checks at the
size users deploy. (The trained demo model, models/demo, comes from `python -m train demo`, with a space; this
module makes random ones.)

    python -m train.blip2.random_checkpoint --out checkpoints/tiny              # tiny preset, seed 0, stage 2
    python -m train.blip2.random_checkpoint --preset small --out checkpoints/small
    python -m train.blip2.random_checkpoint --stage 1 --out checkpoints/stage1
                                                   # Q-Former with ITC/ITM/ITG heads, no LLM
    python -m train.blip2.random_checkpoint --qformer-text --out checkpoints/demo
                                                   # stage 2 that also keeps ITC/ITM/ITG
    python -m train.blip2.random_checkpoint --bert --out checkpoints/bert
                                                   # a small random BERT-style folder (stage1 --qformer-init)
    python -m train.blip2.random_checkpoint --preset blip2-opt-2.7b --dtype float16 \\
        --out checkpoints/blip2-opt-2.7b-random
                                                   # Salesforce/blip2-opt-2.7b's architecture, 3.8B random weights
    python -m train.blip2.random_checkpoint --preset blip2-opt-2.7b --dtype float16 --vision-layers 2 \\
        --qformer-layers 2 --llm-layers 6 \\
        --out checkpoints/blip2-opt-2.7b-6l        # the same widths, fewer layers (677M parameters)
    python -m train.blip2.random_checkpoint --preset tiny-t5 --scales trained --out checkpoints/t5-trained
                                                   # trained-like weight scales: T5's large activations
    python -m train.blip2.random_checkpoint --preset tiny --outliers 3 --out checkpoints/opt-outliers
                                                   # OPT's outlier features (3 LayerNorm channels x20..x60)

The folder is a regular Hugging Face `save_pretrained` folder (config.json,
model.safetensors, tokenizer files, preprocessor_config.json), loadable with
`Blip2ForConditionalGeneration.from_pretrained` (stage 2) or
`Blip2ForImageTextRetrieval.from_pretrained` (stage 1), plus blip2_edge.json and
the extra heads; it is written atomically.
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Blip2Processor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from train.blip2.model import Blip2Edge, EdgeConfig
from train.blip2.presets import PRESETS, blip2_config
from train.blip2.tokenizers import IMAGE_TOKEN, build_qformer_tokenizer, llm_tokenizer


RANDOM_MARK = "random_weights.json"  # written beside a random checkpoint's weights: how they were drawn


def make_random_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, stage: int = 2,
                           qformer_text: bool | None = None, tokenizer_adds_bos: bool = True,
                           dtype: torch.dtype = torch.float32, scales: str = "init", outliers: int = 0,
                           **overrides) -> Path:
    """Build tokenizers + model from `preset` (keyword overrides allowed) and save them to `out`.

    stage 1: Q-Former with its text side, ITC/ITM heads and our ITG head (no LLM).
    stage 2: Q-Former + the preset's LLM (OPT or T5); with qformer_text=True it also keeps the Q-Former's text
    side and heads.
    tokenizer_adds_bos=False: the LLM's tokenizer puts no BOS before a prompt (the model still has one).
    dtype: the weights' type, in memory while they are drawn and in the folder (float16 halves both: the 3.8B
    preset needs 7.6 GB instead of 15). scales="trained": weights at the scales of a trained model
    (`trained_like`); outliers=N: N of its hidden dimensions carry OPT's outlier features. The tokenizers are small
    stand-ins trained on ShapesCaps texts (at most 512 ids, `<image>` the last), whatever the model's vocabulary.
    """
    out = Path(out)
    qformer_text = stage == 1 if qformer_text is None else qformer_text
    vocab = overrides.pop("vocab_size", PRESETS[preset].vocab_size)
    llm = overrides.get("llm", PRESETS[preset].llm)
    tokenizer = llm_tokenizer(llm, min(vocab, 512), **({} if tokenizer_adds_bos else {"add_bos": False}))
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    qtok = build_qformer_tokenizer(min(PRESETS[preset].qformer_vocab_size, 512)) if qformer_text else None
    if qtok is not None:
        overrides.setdefault("qformer_vocab_size", max(PRESETS[preset].qformer_vocab_size, len(qtok)))
    config = blip2_config(preset, vocab_size=max(vocab, len(tokenizer)), image_token_index=image_token, **overrides)
    if stage == 1:
        config.image_token_index = None  # HF's retrieval model then takes plain [CLS] text [SEP] ids
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Blip2Edge(config, EdgeConfig(stage=stage, qformer_text=qformer_text, itg_head=qformer_text)).eval()
    finally:
        torch.set_default_dtype(default)
    if scales == "trained" or outliers:
        trained_like(model, outliers, scales=scales == "trained")
    record = {"weights": "random", "preset": preset, "seed": seed, "scales": scales, "outliers": outliers}

    def mark(tmp: Path) -> None:  # (random weights were trained on nothing: any calibration images serve them)
        (tmp / RANDOM_MARK).write_text(json.dumps(record, indent=1))

    return write_checkpoint(model, out, tokenizer, qtok, stage, before_rename=mark)


@torch.no_grad()
def trained_like(model, outliers: int = 0, seed: int = 0, scales: bool = True) -> None:
    """Give a random model the activations a trained one has, in place (a random initialisation has neither T5's
    large activations nor OPT's outlier features, and a gate tested on it proves little):

    * every linear weight drawn at 3 / sqrt(fan_in) (std), the LLM's embeddings x2: each product then grows its
      input's scale, T5's unscaled attention gets sharp softmaxes and its residual stream large values, as trained
      Flan-T5 has (Hugging Face keeps T5's `wo` in fp32 for this reason);
    * `outliers` > 0 (OPT): that many hidden dimensions of the LayerNorm outputs inside each decoder layer x20..x60
      (each LayerNorm's gain and bias in those dimensions), and the weights reading them /20..60 in the same input
      channels, so the model computes what it did: the outlier features real OPT checkpoints have from 6.7B on
      (LLM.int8(), SmoothQuant), a few input channels of every product 20-60x the rest, with the weights trained
      around them. One int8 scale per activation tensor then leaves the other channels a few of its 8 bits.
    `scales=False`: the outlier features alone, on Hugging Face's initialisation.
    """
    gen = torch.Generator().manual_seed(seed)
    lm = getattr(model, "language_model", None)
    tied = lm.get_input_embeddings().weight if lm is not None else None
    for module in model.modules() if scales else ():
        if isinstance(module, torch.nn.Linear) and module.weight is not tied:  # (a tied head: the embeddings)
            fan_in = module.weight.shape[1]
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (3 / fan_in ** 0.5))
    if lm is None:
        return
    for module in lm.modules() if scales else ():
        if isinstance(module, torch.nn.Embedding):
            module.weight.mul_(2)
    if outliers:
        width = tied.shape[1]
        dims = torch.randperm(width, generator=gen)[:outliers]
        factors = torch.linspace(20, 60, outliers)
        pairs = _norms_and_readers(lm)
        if not pairs:
            raise ValueError(f"outliers={outliers}: outlier features are made for OPT's LayerNorms; this LLM is "
                             f"{model.config.text_config.model_type}. Use --scales trained for T5's large activations")
        for norm, products in pairs:
            norm.weight[dims] *= factors
            if norm.bias is not None:
                norm.bias[dims] *= factors
            for linear in products:  # the weights absorb them: the model computes what it computed before
                linear.weight[:, dims] /= factors


def _norms_and_readers(lm) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """(LayerNorm, the linear layers that read its output) inside each decoder layer of an OPT."""
    pairs = []
    for layer in lm.modules():
        if all(hasattr(layer, a) for a in ("self_attn_layer_norm", "final_layer_norm", "fc1", "self_attn")):
            attn = layer.self_attn
            pairs += [(layer.self_attn_layer_norm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                      (layer.final_layer_norm, [layer.fc1])]
    return pairs


def write_checkpoint(model, out: str | Path, tokenizer, qformer_tokenizer, stage: int | None = None,
                     before_rename=None) -> Path:
    """Save `model` as a checkpoint folder of `stage` (default: the model's) with its tokenizers and image
    processor, atomically: everything goes to a temporary folder renamed at the end. `before_rename(tmp)`
    may add files (e.g. an evaluation report) first."""
    out, stage = Path(out), stage or model.edge.stage
    size = model.config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, stage=stage)
        if stage == 2:
            Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                           num_query_tokens=model.config.num_query_tokens).save_pretrained(tmp)
            if qformer_tokenizer is not None:
                qformer_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
        else:
            image_processor.save_pretrained(tmp)
            qformer_tokenizer.save_pretrained(tmp)
        if before_rename is not None:
            before_rename(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_bert(out: str | Path, hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int = 512,
              vocab: int = 512, seed: int = 0) -> Path:
    """A BERT-style folder (BertForMaskedLM, random weights, WordPiece tokenizer from the ShapesCaps texts): a small
    stand-in for bert-base-uncased as `python -m train stage1 --qformer-init`."""
    from transformers import BertConfig, BertForMaskedLM

    tok = build_qformer_tokenizer(vocab)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    out = Path(out)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.blip2.random_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/demo", help="folder to write (replaced if it exists)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2])
    ap.add_argument("--qformer-text", action="store_true",
                    help="stage 2: keep the Q-Former's text side and ITC/ITM/ITG heads (ITM, retrieval, ITG captions)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="the weights' type in memory and in the folder (float16: half the memory and disk)")
    ap.add_argument("--bert", action="store_true", help="write a small random BERT-style folder instead (a stand-in "
                    "for bert-base-uncased as `python -m train stage1 --qformer-init`)")
    ap.add_argument("--scales", default="init", choices=["init", "trained"],
                    help="init: Hugging Face's initialisation; trained: weights at a trained model's scales "
                    "(3/sqrt(fan_in), the LLM's embeddings x2): T5's large activations")
    ap.add_argument("--outliers", type=int, default=0, metavar="N",
                    help="OPT: N hidden dimensions of its LayerNorm outputs x20..x60 and the weights reading them "
                    "/20..60, the same model (the outlier features of OPT from 6.7B on); at either --scales")
    for part in ("vision", "qformer", "llm"):
        ap.add_argument(f"--{part}-layers", type=int, help=f"{part} layers instead of the preset's")
    args = ap.parse_args(argv)
    if args.bert:
        print(f"wrote {make_bert(args.out, seed=args.seed)}")
        return
    layers = {f"{part}_layers": n for part in ("vision", "qformer", "llm")
              if (n := getattr(args, f"{part}_layers")) is not None}
    path = make_random_checkpoint(args.out, args.preset, args.seed, stage=args.stage,
                                  qformer_text=True if args.stage == 1 else args.qformer_text,
                                  dtype=getattr(torch, args.dtype), scales=args.scales, outliers=args.outliers,
                                  **layers)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
