"""The options of `python -m train stage1|stage2|finetune` (no torch here: `python -m train eval --engines` parses
its command line without it). What the commands do: train/training/tasks.py."""
from dataclasses import dataclass, fields


@dataclass
class Options:
    """Every training option, with the BLIP-2 recipe's defaults (LAVIS: AdamW betas 0.9/0.98, weight decay 0.05,
    peak lr 1e-4 for pre-training and 1e-5 for fine-tuning, linear warm-up then cosine decay to 0.1x)."""
    steps: int | None = None  # optimizer steps; default: --epochs over the data
    epochs: float = 1.0
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step: effective batch = batch_size * grad_accum * processes
    lr: float | None = None  # default 1e-4 (stage1, stage2) or 1e-5 (finetune)
    min_lr_ratio: float = 0.1
    warmup: int = 1000  # steps, capped at a tenth of the run
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 2  # image-decoding processes per training process
    precision: str = "auto"  # fp32 | bf16 | fp16 autocast; auto: bf16 on a GPU that has it, fp32 on CPU
    max_bad: int = 0  # missing or unreadable images tolerated (skipped, counted) before the run stops
    feature_cache: bool = False  # keep the frozen ViT's outputs (float16, memory-mapped) for later epochs
    prompt: str | None = None  # captions' LLM prompt; default: none (stage2), "a photo of" (finetune caption)
    aux_every: int = 0  # stage2: also the stage-1 losses every this many steps (0: off, as BLIP-2)
    train_vit: bool | None = None  # default: finetune caption/retrieval train it, the rest keep it frozen
    log_every: int = 50
    save_every: int = 250


TASKS = ("caption", "vqa", "retrieval")


def add_arguments(ap, command: str) -> None:
    ap.add_argument("--data", required=True, metavar="TRAIN", help="training data: a COCO captions *.json (with "
                    "--images), a *.jsonl of {image, caption} or {image, question, answers} rows, or WebDataset "
                    "*.tar shards (a file, a folder of them, or a *.txt list)")
    ap.add_argument("--images", metavar="DIR", help="COCO captions: the folder holding the images")
    ap.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write (written atomically at "
                    "the end; export it with python -m export.build --model DIR)")
    ap.add_argument("--run-dir", dest="run", metavar="DIR", help="folder for the resumable state, the JSONL log, "
                    "TensorBoard events and the settings (default runs/<out name>); not --run: torchrun would take it")
    ap.add_argument("--init", metavar="SOURCE", help={
        "stage1": "a BLIP-2 checkpoint (folder or hub id) whose ViT and Q-Former are reused",
        "stage2": "the stage-1 checkpoint to connect to the LLM",
        "finetune": "the checkpoint to fine-tune (stage 2 for caption/vqa)"}[command])
    if command == "stage1":
        ap.add_argument("--vision", metavar="DIR", help="instead of --init: a BLIP-2 or Blip2VisionModel folder whose "
                        "vision tower is used (frozen)")
        ap.add_argument("--qformer-init", metavar="DIR", help="with --vision: a BERT-style folder initialising the "
                            "Q-Former's self-attention, feed-forward and embeddings (cross-attention starts random)")
        ap.add_argument("--num-queries", type=int, default=32, help="learned queries (default 32, as BLIP-2)")
        ap.add_argument("--cross-attention-every", type=int, default=2, help="a cross-attention layer every N "
                        "Q-Former layers (default 2, as BLIP-2)")
    if command == "stage2":
        ap.add_argument("--llm", metavar="LLM_SOURCE", help="the frozen LLM: an OPT or T5 folder with its tokenizer, "
                        "or a BLIP-2 checkpoint whose LLM is taken")
    if command == "finetune":
        ap.add_argument("--task", required=True, choices=TASKS)
    for f in fields(Options):
        flag = f"--{f.name.replace('_', '-')}"
        if "bool" in str(f.type):
            ap.add_argument(flag, action="store_true", default=None, help=_HELP.get(f.name))
        else:
            kind = _type(f)
            ap.add_argument(flag, type=kind, default=None, metavar={int: "N", float: "X"}.get(kind, "TEXT"),
                            help=_HELP.get(f.name, "") + ("" if f.default is None else f" (default {f.default})"))


def _type(f):
    text = str(f.type)
    return int if "int" in text else float if "float" in text else str


_HELP = {
    "steps": "optimizer steps (default: --epochs over the data)", "epochs": "passes over the data",
    "batch_size": "images per process and micro-batch", "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (default 1e-4 for stage1/stage2, 1e-5 for finetune)",
    "min_lr_ratio": "the cosine decays to lr times this", "warmup": "linear warm-up steps (at most a tenth of the run)",
    "workers": "image-decoding processes per training process", "precision": "fp32, bf16, fp16 or auto",
    "max_bad": "missing or unreadable images tolerated (skipped and counted)",
    "feature_cache": "keep the frozen ViT's outputs in float16 on disk for later epochs",
    "prompt": "the LLM prompt before captions (finetune caption: 'a photo of')",
    "aux_every": "stage2: the stage-1 losses too, every N steps (0: off)",
    "train_vit": "train the ViT too (default for finetune caption/retrieval)",
}


class OptionError(ValueError):
    """A training option out of its range (the CLI prints it as one line)."""


def options_from(args) -> Options:
    options = Options(**{f.name: getattr(args, f.name) for f in fields(Options)
                         if getattr(args, f.name, None) is not None})
    positive = {"steps": options.steps, "epochs": options.epochs, "batch_size": options.batch_size,
                "grad_accum": options.grad_accum, "log_every": options.log_every, "save_every": options.save_every}
    for name, value in positive.items():
        if value is not None and not value > 0:  # (--steps 0 trained a whole epoch before)
            raise OptionError(f"--{name.replace('_', '-')} {value}: give a number above 0"
                              + (" (leave --steps out to train --epochs over the data)" if name == "steps" else ""))
    return options


