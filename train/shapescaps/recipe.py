"""The demo recipe: a working BLIP-2 from nothing, on ShapesCaps, on a laptop CPU.

    python -m train demo --out checkpoints/demo          # 51 minutes on 2 cores (reproduces models/demo bit for bit)
    python -m train demo --out checkpoints/demo          # again: resumes / skips what is done
    python -m train demo --preset demo-t5 --out checkpoints/demo-t5   # the same with a Flan-T5-style LLM

Phases, each resumable (its state file lives in --run, default runs/<name>):
  1. tokenizers: byte-level BPE for OPT and WordPiece (with [DEC]) for the Q-Former, built from the
     ShapesCaps texts;
  2. backbones: the ViT on attribute classification, the LLM (OPT or T5) as a language model of the texts
     that reads a context back (what BLIP-2 downloads; skipped for phases already done);
  3. the training images go through the frozen ViT once;
  4. stage 1: ITC + ITM + ITG on the Q-Former  -> <run>/stage1 (a stage-1 checkpoint folder);
  5. stage 2: LM loss through the frozen LLM (OPT: language modelling; T5: prefix LM), + the stage-1 losses
     so one folder does everything
     -> --out, written atomically with its held-out evaluation (eval.json) inside.
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)



@dataclass
class Recipe:
    preset: str = "demo"
    seed: int = 0
    train_images: int = 10000
    corpus_texts: int = 20000
    llm_vocab: int = 512
    qformer_vocab: int = 512
    batch_size: int = 32
    vision_batch_size: int = 64
    vision_steps: int = 2000  # 400 left the ViT at its label prior (attribute BCE 0.19, ITC R@1 0.47)
    llm_steps: int = 12000  # in-context reading forms late: seed 0 re-read 2-shape captions 0.38 at 4000, 1.00 from
                            # 8000; text QA 0.88 at 8000, 0.94 at 10000-12000
    stage1_steps: int = 1500
    stage2_steps: int = 3000
    aux_every: int = 2  # stage 2: the stage-1 losses every this many steps
    qa_fraction: float = 0.5  # stage 2: the share of an image's examples that are a question and its answer
    lr: float = 1e-3
    eval_n: int = 200
    fp16_weights: bool = True  # store the final checkpoint's weights in float16 (half the size; evaluated as stored)

    def config(self, steps: int, **kw):
        from train.training.trainer import TrainConfig

        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           log_every=max(1, min(100, steps // 5)), **kw)


# What differs from the Recipe's defaults for a preset's recipe (`python -m train demo --preset demo-t5`).
PRESET_RECIPES = {
    "demo": {},
    # with half the examples questions, 3,000 stage-2 steps left T5 at caption 0.840 / VQA 0.815 and 8,000 at
    # 0.960 / 0.870 (VQA target 0.90 missed); 12,000 with 65% questions give 1.000 / 0.900
    "demo-t5": {"stage2_steps": 12000, "qa_fraction": 0.65},
}


def recipe_for(preset: str = "demo", **overrides) -> Recipe:
    """The recipe of a demo preset, with `overrides` (the command line's options) on top."""
    if preset not in PRESET_RECIPES:
        raise ValueError(f"no demo recipe for preset {preset!r}; choose one of {', '.join(PRESET_RECIPES)}")
    return Recipe(**{"preset": preset, **PRESET_RECIPES[preset], **overrides})


def build_tokenizers(recipe: Recipe):
    from train.shapescaps.synthetic import text_corpus
    from train.blip2.presets import PRESETS
    from train.blip2.tokenizers import build_qformer_tokenizer, llm_tokenizer

    corpus = list(text_corpus(n_train=recipe.corpus_texts, seed=recipe.seed))
    return (llm_tokenizer(PRESETS[recipe.preset].llm, recipe.llm_vocab, corpus),
            build_qformer_tokenizer(recipe.qformer_vocab, corpus))


def build_model(recipe: Recipe, tok, qtok):
    from train.blip2.model import Blip2Edge, EdgeConfig
    from train.blip2.presets import blip2_config
    from train.blip2.tokenizers import IMAGE_TOKEN

    import torch

    config = blip2_config(recipe.preset, vocab_size=len(tok), qformer_vocab_size=len(qtok),
                          image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(recipe.seed)
    ids = {"cls_token_id": qtok.cls_token_id, "sep_token_id": qtok.sep_token_id, "pad_token_id": qtok.pad_token_id,
           "dec_token_id": qtok.convert_tokens_to_ids("[DEC]")}
    return Blip2Edge(config, EdgeConfig(stage=2, qformer_text=True, itg_head=True, **ids))


def run_demo(out: Path, run: Path, recipe: Recipe) -> Path:
    from train.blip2.checkpoint import preprocessor
    from train.shapescaps.backbones import pretrain_llm, pretrain_vision
    from train.blip2.random_checkpoint import write_checkpoint
    from train.shapescaps.stages import run_stage1, run_stage2, shapescaps_set
    from train.training.trainer import check_resume

    check_resume(run, asdict(recipe), "recipe.json", flag="--run")  # (another preset or steps: not this run's)
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    logger.info(f"[1/5] tokenizers (ShapesCaps texts, {recipe.corpus_texts} samples)")
    tok, qtok = build_tokenizers(recipe)
    model = build_model(recipe, tok, qtok)
    preprocess = preprocessor(model)
    llm = model.config.text_config.model_type.upper()
    logger.info(f"[2/5] backbones: ViT on attribute classification, {llm} on the texts "
                f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in all)")
    vision_cfg = recipe.config(recipe.vision_steps)
    vision_cfg.batch_size = recipe.vision_batch_size
    pretrain_vision(model.vision_model, preprocess, model.config.vision_config.image_size, vision_cfg,
                    seed=recipe.seed, state_file=run / "vision.state")
    llm_cfg = recipe.config(recipe.llm_steps)
    llm_cfg.batch_size = recipe.vision_batch_size
    pretrain_llm(model.language_model, tok, llm_cfg, n_texts=recipe.corpus_texts,
                 seed=recipe.seed, state_file=run / "llm.state")
    logger.info(f"[3/5] encoding {recipe.train_images} training images with the frozen ViT")
    data = shapescaps_set(model.vision_model, preprocess, recipe.train_images, model.config.vision_config.image_size,
                          seed=recipe.seed)
    logger.info("[4/5] stage 1: ITC + ITM + ITG")
    run_stage1(model, data, qtok, recipe.config(recipe.stage1_steps), run / "stage1.state")
    write_checkpoint(model, run / "stage1", None, qtok, stage=1)
    logger.info(f"      wrote the stage-1 checkpoint {run / 'stage1'}")
    logger.info(f"[5/5] stage 2: the frozen {model.config.text_config.model_type.upper()}'s loss (+ stage-1 losses)")
    run_stage2(model, data, tok, qtok, recipe.config(recipe.stage2_steps), run / "stage2.state",
               qa_fraction=recipe.qa_fraction, aux_every=recipe.aux_every)
    if recipe.fp16_weights:
        model.half()  # the evaluation below loads the folder back in float32: it measures what is stored
    return write_checkpoint(model, out, tok, qtok, stage=2, before_rename=lambda tmp: _evaluate(tmp, out, recipe))


def _evaluate(folder: Path, out: Path, recipe: Recipe) -> None:
    """Write the recipe (what reproduces the folder) and its held-out evaluation into the checkpoint folder
    `folder`, the temporary name of `out` (recorded as the evaluated folder: it is `out` once renamed)."""
    from train.evaluation.backends import TorchBackend
    from train.shapescaps.evaluate import evaluate, format_table

    (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))

    results = evaluate(TorchBackend(folder), n=recipe.eval_n, seed=recipe.seed)
    results["folder"] = str(out)
    logger.info(format_table(results))
    (folder / "eval.json").write_text(json.dumps(results, indent=2))
