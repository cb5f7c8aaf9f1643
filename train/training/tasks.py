"""Training on a user's data: stage 1, stage 2 and the fine-tuning tasks, streamed from disk.

    python -m train stage1   --data TRAIN --vision models/demo --qformer-init bert/ --out runs/s1
    python -m train stage2   --data TRAIN --init runs/s1 --llm models/demo --out runs/s2
    python -m train finetune --task caption --data TRAIN --init runs/s2 --out runs/caption

What each command trains (the LLM is always frozen; BLIP-2's recipe, LAVIS's configurations):

| command | objective | trained | ViT |
|---|---|---|---|
| stage1 | ITC + ITM (hard negatives) + ITG on captions | Q-Former, its text side and heads | frozen |
| stage2 | the LLM's loss (OPT: LM after the soft prompt; T5: prefix LM) on captions, and on answers of VQA rows | Q-Former, projection | frozen |
| finetune --task caption | the LLM's loss on captions after the prompt "a photo of" | Q-Former, projection, ViT | trained |
| finetune --task vqa | the LLM's loss on the most common answer after "Question: ... Answer:"; the question also goes to the Q-Former (bi-directional, with the queries) | Q-Former, projection | frozen (--train-vit to train it) |
| finetune --task retrieval | ITC + ITM + ITG | Q-Former, text side, heads, ViT | trained |

Every step reads its images from disk through `train.training.streaming.ImageStream` (worker processes, the
runtime's preprocessing); the ViT runs inside the step. With the ViT frozen, `--feature-cache` keeps
its outputs in float16 in the run folder for the next epochs. Every option's value is printed at
start and saved as `train_args.json` in the run folder and the checkpoint; the run resumes where it
stopped when the same command runs again (same data order); the checkpoint is written atomically, by
rank 0 only, once training ends.
"""
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from train.blip2.families import family
from train.blip2.presets import image_tokens
from train.training.batches import lm_batch, qformer_batch
from train.training.datasets import DataError, qa_prompt
from train.training.losses import stage1_losses, world
from train.training.options import OptionError, Options, options_from
from train.training.trainer import RunFolderError, TrainConfig, check_resume, fit, trainable

logger = logging.getLogger(__name__)



def _defaults(command: str, task: str | None, opts: Options) -> Options:
    o = Options(**asdict(opts))
    if o.lr is None:
        o.lr = 1e-5 if command == "finetune" else 1e-4
    if o.train_vit is None:
        o.train_vit = command == "finetune" and task in ("caption", "retrieval")
    if o.prompt is None and command == "finetune" and task == "caption":
        o.prompt = "a photo of"  # BLIP-2's captioning fine-tune prompt
    if o.precision == "auto":
        o.precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if o.precision not in ("fp32", "bf16", "fp16"):
        raise DataError(f"--precision {o.precision}: choose fp32, bf16, fp16 or auto")
    if o.feature_cache and o.train_vit:
        raise DataError("--feature-cache keeps a frozen ViT's outputs; it cannot be used while the ViT is trained "
                        "(--train-vit, or finetune --task caption/retrieval)")
    return o


# ----------------------------------------------------------------------------- objectives

def _device(model) -> torch.device:
    return model.query_tokens.device


def same_matrix(stream, step: int, keys: list[str]) -> torch.Tensor:
    """[B, B*W]: True where another row of any process's batch shows the same image (not a negative)."""
    rank, size = world()
    every = stream.keys(stream.every_rank(step))
    every[rank * len(keys): (rank + 1) * len(keys)] = keys
    same = torch.tensor([[a == b for b in every] for a in keys])
    own = torch.arange(len(keys))
    same[own, rank * len(keys) + own] = False
    return same


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, world()[0], 17])


def stage1_step_losses(model, stream, step: int, batch: dict, embeds, qtok, seed: int, generator) -> dict:
    """ITC + ITM + ITG on a batch of captioned images whose ViT outputs are `embeds`."""
    rng = _rng(seed, step)
    texts = [_pick(stream.data.examples[i].captions, rng) for i in batch["index"]]
    ids, mask = (t.to(_device(model)) for t in qformer_batch(qtok, texts, model.edge.max_text_tokens))
    same = same_matrix(stream, step, batch["keys"]).to(_device(model))
    return stage1_losses(model, embeds, ids, mask, same, generator)


def stage1_objective(model, stream, qtok, seed: int, train_vit: bool):
    def objective(step, generator):
        batch = stream.batch(step)
        embeds = stream.image_embeds(model, batch, train_vit)
        return stage1_step_losses(model, stream, step, batch, embeds, qtok, seed, generator)
    return objective


def _pick(texts, rng) -> str:
    return texts[int(rng.integers(len(texts)))]


def top_answer(answers) -> str:
    """The most common answer (the first of them on a tie): what the LLM is taught to say."""
    counts = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def lm_example(example, prompt: str | None, llm, rng) -> tuple[str | None, str]:
    if example.kind == "vqa":
        return qa_prompt(example.question), top_answer(list(example.answers))
    caption = _pick(example.captions, rng)
    return llm.caption_example(caption, rng) if prompt is None else (prompt, caption)


def lm_objective(model, stream, tok, qtok, opts: Options, questions_to_qformer: bool):
    llm = family(model.config)

    def objective(step, generator):
        batch = stream.batch(step)
        embeds = stream.image_embeds(model, batch, opts.train_vit)
        rng = _rng(opts.seed, step)
        rows = [stream.data.examples[i] for i in batch["index"]]
        examples = [lm_example(e, opts.prompt, llm, rng) for e in rows]
        if questions_to_qformer:
            ids, mask = (t.to(_device(model)) for t in qformer_batch(qtok, [e.question for e in rows],
                                                                      model.edge.max_text_tokens))
            query_output = model.itm_forward(embeds, ids, mask)[1]
        else:
            query_output = model.query_forward(embeds)[0]
        inputs = {k: v.to(_device(model)) for k, v in lm_batch(model, tok, examples).items()}
        losses = {"lm": llm.stage2_loss(model, model.soft_prompt(query_output), inputs)}
        losses["loss"] = losses["lm"]
        if opts.aux_every and step % opts.aux_every == 0:  # the same images: read and encoded once
            extra = stage1_step_losses(model, stream, step, batch, embeds, qtok, opts.seed + 1, generator)
            losses.update({k: v for k, v in extra.items() if k != "loss"})
            losses["loss"] = losses["lm"] + extra["loss"]
        return losses
    return objective


# ----------------------------------------------------------------------------- running a command

def frozen_prefixes(command: str, task: str | None, train_vit: bool) -> tuple[str, ...]:
    frozen = ["language_model."]
    if not train_vit:
        frozen.append("vision_model.")
    if command == "stage1" or task == "retrieval":
        frozen.append("language_projection.")
    return tuple(frozen)


def hold_frozen_in(model, frozen: tuple[str, ...], dtype: torch.dtype) -> None:
    """Frozen backbones held once, in `dtype` (bf16 / fp16 training): half their float32 memory."""
    for prefix in frozen:
        module = getattr(model, prefix.rstrip("."), None)
        if module is not None:
            module.to(dtype)


def check_data(data, command: str, task: str | None) -> None:
    """The rows a command trains on must be there; VQA rows are what --task vqa needs."""
    kinds = data.kinds
    wants = "vqa" if task == "vqa" else "caption"
    if command == "stage2" and kinds:
        return
    if wants not in kinds:
        what = {"vqa": "VQA rows ({\"image\", \"question\", \"answers\"})", "caption": "captioned images"}[wants]
        name = f"finetune --task {task}" if task else command
        raise DataError(f"{name} trains on {what}, and {data.source} has none ({data.describe()})")


def start_model(command: str, task: str | None, args):
    """(model, LLM tokenizer or None, Q-Former tokenizer) the command starts from."""
    from train.training import sources

    if command == "stage1":
        model, qtok = sources.stage1_start(args.init, args.vision, args.qformer_init, args.num_queries,
                                           args.cross_attention_every)
        return model, None, qtok
    if command == "stage2":
        if args.init is None or args.llm is None:
            raise DataError("stage2 needs --init STAGE1_DIR (a stage-1 checkpoint) and --llm LLM (an OPT/T5 folder, or "
                            "a BLIP-2 checkpoint whose LLM is taken)")
        return sources.stage2_start(args.init, args.llm)
    if args.init is None:
        raise DataError("finetune needs --init CHECKPOINT (a stage-2 checkpoint for caption/vqa; one with the "
                        "Q-Former's text side for retrieval)")
    model, tok, qtok = sources.finetune_start(args.init)
    if task in ("caption", "vqa") and tok is None:
        raise DataError(f"finetune --task {task} needs a checkpoint with an LLM; {args.init} is a stage-1 checkpoint "
                        f"(run `python -m train stage2` first)")
    if task in ("vqa", "retrieval") and qtok is None:
        raise DataError(f"finetune --task {task} feeds text to the Q-Former; {args.init} has no Q-Former text side")
    return model, tok, qtok


def _config(opts: Options, steps: int) -> TrainConfig:
    autocast = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[opts.precision]
    return TrainConfig(steps=steps, batch_size=opts.batch_size, lr=opts.lr, min_lr_ratio=opts.min_lr_ratio,
                       warmup=max(1, min(opts.warmup, steps // 10)), weight_decay=opts.weight_decay,
                       grad_clip=opts.grad_clip, seed=opts.seed, log_every=opts.log_every,
                       save_every=opts.save_every, grad_accum=opts.grad_accum, autocast=autocast)


# settings a run may resume with changed: where the result goes, and how it is read or logged, not what it computes
RESUMABLE = frozenset({"out", "run", "workers", "log_every", "save_every", "max_bad", "feature_cache",
                       "trained_parameters"})


def run_command(command: str, task: str | None, args, opts: Options) -> Path:
    """Train `command` (stage1 | stage2 | finetune with `task`) on args.data; write the checkpoint args.out."""
    from train.training.datasets import open_dataset
    from train.blip2.random_checkpoint import write_checkpoint
    from train.blip2.checkpoint import preprocessor
    from train.training.streaming import FeatureCache, ImageStream

    opts = _defaults(command, task, opts)
    rank, size = world()
    data = open_dataset(args.data, args.images, opts.max_bad)
    check_data(data, command, task)
    if opts.aux_every and "vqa" in data.kinds:
        raise DataError(f"--aux-every adds the stage-1 losses, which need a caption for every image; {data.source} "
                        f"also has VQA rows ({data.describe()}): train stage 2 on captions only, or drop --aux-every")
    if command != "stage2":
        data = data.only("vqa" if task == "vqa" else "caption")
    out, run = Path(args.out), Path(args.run or Path("runs") / Path(args.out).name)
    logger.info(f"data: {data!r}" + (f"; {len(data.skipped)} missing images skipped (first: {data.skipped[0]})"
                                     if data.skipped else ""))
    steps_per_epoch = len(data) // (opts.batch_size * opts.grad_accum * size)
    steps = opts.steps or max(1, round(opts.epochs * steps_per_epoch))
    cfg = _config(opts, steps)
    frozen = frozen_prefixes(command, task, opts.train_vit)
    settings = {"command": command, "task": task, **{k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items() if k not in ("func",)},
                **asdict(opts), "steps": steps, "processes": size, "frozen": list(frozen)}
    check_resume(run, settings, "train_args.json", RESUMABLE)  # (before the model is loaded)
    torch.manual_seed(opts.seed)  # the new parts' initial weights: a function of the seed
    model, tok, qtok = start_model(command, task, args)
    params = trainable(model, frozen)
    if opts.precision != "fp32":
        hold_frozen_in(model, frozen, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[opts.precision]))
    settings["trained_parameters"] = sum(p.numel() for p in params)
    logger.info("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    run.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run / "train_args.json").write_text(json.dumps(settings, indent=2) + "\n")
    cache = None
    if opts.feature_cache:
        v = model.config.vision_config
        cache = FeatureCache(run / f"features-rank{rank}", len(data), (image_tokens(v), v.hidden_size), str(args.data))
    stream = ImageStream(data, preprocessor(model), opts.batch_size, opts.seed, opts.workers, rank, size,
                         opts.max_bad - len(data.skipped), cache)
    if command == "stage1" or task == "retrieval":
        objective = stage1_objective(model, stream, qtok, opts.seed, opts.train_vit)
    else:
        objective = lm_objective(model, stream, tok, qtok, opts, questions_to_qformer=task == "vqa")
    name = command if task is None else f"{command}-{task}"
    fit(name, model, params, objective, cfg, run / "state.pt", log_file=run / "log.jsonl")
    if stream.bad:
        first = next(iter(stream.bad.values()))
        logger.info(f"{len(stream.bad)} images could not be decoded and were skipped (first: {first})")
    model.float()
    if rank != 0:
        return out
    stage = 1 if command == "stage1" else model.edge.stage
    return write_checkpoint(model, out, tok if stage == 2 else None, qtok, stage=stage,
                            before_rename=lambda tmp: (tmp / "train_args.json").write_text(
                                json.dumps(settings, indent=2)))


def main(command: str, args) -> int:
    from train.blip2.checkpoint import CheckpointError
    from train.training.trainer import NonFiniteLoss, init_distributed

    try:
        options = options_from(args)  # (checked before any process group or data)
    except OptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed()
    try:
        path = run_command(command, getattr(args, "task", None), args, options)
    except (DataError, CheckpointError, NonFiniteLoss, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if world()[0] == 0:
        print(f"wrote {path}")
    return 0
