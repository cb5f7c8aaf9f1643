"""The trainer's command line.

    python -m train demo --out checkpoints/demo        # ShapesCaps from scratch: backbones, stage 1, stage 2, eval
    python -m train demo --preset demo-t5 --out checkpoints/demo-t5   # ... with a Flan-T5-style LLM
    python -m train demo --out checkpoints/demo --quick   # a few steps of everything (smoke test, not accurate)
    python -m train eval --model checkpoints/demo       # held-out ShapesCaps metrics of a checkpoint
    python -m train eval --engines engines/demo/onnx    # ... of an exported engine folder

On your own data (COCO captions *.json + --images, JSONL rows, or WebDataset *.tar shards; train/training/tasks.py):
    python -m train stage1   --data TRAIN --init SOURCE --out DIR            # or --vision DIR --qformer-init BERT_DIR
    python -m train stage2   --data TRAIN --init STAGE1_DIR --llm LLM_SOURCE --out DIR
    python -m train finetune --task caption|vqa|retrieval --data TRAIN --init CHECKPOINT --out DIR
    python -m train eval     --model DIR --data VAL [--task caption|vqa|retrieval]   # BLEU-4/CIDEr, VQAv2, R@1/5/10

Multi-process (data parallel, ITC negatives gathered across processes):
    torchrun --nproc_per_node 2 -m train demo --out checkpoints/demo
Interrupted runs resume: run the same command again.
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

QUICK = {"train_images": 256, "corpus_texts": 2000, "vision_steps": 5, "llm_steps": 5, "stage1_steps": 5,
         "stage2_steps": 5, "eval_n": 16, "batch_size": 16}


def recipe_from(args):
    """The demo Recipe the command line asks for: the preset's recipe, --quick's steps, then every option given."""
    from train.shapescaps.recipe import Recipe, recipe_for

    overrides = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name, None) is not None}
    preset = overrides.pop("preset", "demo")
    return recipe_for(preset, **{**(QUICK if args.quick else {}), **overrides})


def _demo(args) -> int:
    from train.shapescaps.recipe import run_demo
    from train.training.trainer import NonFiniteLoss, RunFolderError, init_distributed

    init_distributed()
    recipe = recipe_from(args)
    run = args.run or Path("runs") / (Path(args.out).name + ("-quick" if args.quick else ""))
    try:
        path = run_demo(Path(args.out), Path(run), recipe)
    except (NonFiniteLoss, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def tasks_doc() -> str:
    """train/training/tasks.py's docstring (what each command trains), read without importing torch."""
    import ast

    return ast.get_docstring(ast.parse((Path(__file__).parent / "training" / "tasks.py").read_text())) or ""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the demo model on ShapesCaps from scratch (resumable)")
    demo.add_argument("--out", default="checkpoints/demo", help="checkpoint folder to write (default checkpoints/demo)")
    demo.add_argument("--run", help="folder for resumable training state (default runs/<out name>)")
    demo.add_argument("--quick", action="store_true", help="a few steps of every phase: checks the plumbing only")
    from train.shapescaps.recipe import Recipe

    for f in fields(Recipe):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):  # --fp16-weights / --no-fp16-weights (type=bool would read "False" as True)
            demo.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                              help=f"(default {'on' if f.default else 'off'})")
        else:
            demo.add_argument(flag, type=type(f.default), default=None, help=f"(default {f.default})")
    from train.shapescaps import evaluate
    from train.training import options

    evaluate.add_arguments(sub.add_parser("eval", help="held-out metrics of a checkpoint or engine folder: ShapesCaps, "
                                          "or your --data (BLEU-4/CIDEr, VQAv2 accuracy, retrieval recall)"))
    for command, what in (("stage1", "BLIP-2 stage 1 on your data: ITC + ITM + ITG on the Q-Former, ViT frozen"),
                          ("stage2", "BLIP-2 stage 2 on your data: connect a frozen LLM (OPT or T5)"),
                          ("finetune", "fine-tune a checkpoint on your data for captioning, VQA or retrieval")):
        options.add_arguments(sub.add_parser(command, help=what, description=tasks_doc(),
                                             formatter_class=argparse.RawDescriptionHelpFormatter), command)
    return ap


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted: the last saved training state is kept (every --save-every steps); run the same command "
              "again to resume from it", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    import logging
    import os

    from train.blip2.logs import quiet_libraries

    # (under torchrun, one process says what the run does: the others only their warnings and errors)
    quiet_libraries(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    if args.command == "demo":
        return _demo(args)
    if args.command in ("stage1", "stage2", "finetune"):
        from train.training import tasks

        return tasks.main(args.command, args)
    from train.shapescaps import evaluate

    return evaluate.run(args)


if __name__ == "__main__":
    sys.exit(main())
