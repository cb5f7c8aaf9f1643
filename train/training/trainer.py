"""The training loop every stage shares: AdamW, warm-up + cosine schedule, gradient clipping,
progress bar and loss lines, resumable state, a NaN/inf guard, and data parallelism.

    from train.training.trainer import TrainConfig, fit
    fit("stage1", model, trainable_params, objective, TrainConfig(steps=1500), state_file=run / "state.pt")

`objective(step, generator) -> {"loss": tensor, ...}` builds its own batch from the step number
(and the process rank), so a run is a pure function of its seed: after a kill, `fit` resumes from
the last saved state and reaches the same weights as a run that was never interrupted.

Several processes (`torchrun --nproc_per_node 2 -m train ...`; gloo on CPU, nccl on GPU) each
compute their own batch; gradients are averaged across processes after every backward pass (what
DistributedDataParallel does, without its wrapper, since the objectives call several model
methods). ITC gathers features from every process itself (train.training.losses.gather).
"""
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.training.losses import world

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * this
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    save_every: int = 250
    grad_accum: int = 1  # micro-batches per optimizer step (objective called with micro-step step * grad_accum + k)
    autocast: str | None = None  # "bfloat16" / "float16": the objective runs under torch.autocast with this type


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the last good state was kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (a pure function of the step, so a resumed run takes
    up the schedule where it stopped). transformers' `get_cosine_with_min_lr_schedule_with_warmup` gives the same
    values from the end of the warm-up on (equal to float rounding, 10 warm-up steps of 100), but its warm-up starts
    one step later, at lr 0 (step 0: 0 there, lr / warmup here): taking it would change every run's first steps, and so
    the shipped demo model that `python -m train demo` reproduces exactly."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _average_gradients(params) -> None:
    """Average the gradients of `params` over the processes (data parallel). Not DistributedDataParallel: its
    gradient hooks are armed by the wrapped module's forward(), and the objectives call Blip2Edge's own methods
    (itc_forward, itm_forward, the LLM's loss: several per step, on the parameters each stage trains), which
    DistributedDataParallel would not see; wrapping each in a module of its own would bucket the same parameters
    twice. The cost is the overlap of communication with backward, which DDP has and this does not."""
    rank, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= size


def _all_finite(losses: dict) -> bool:
    finite = torch.tensor(float(all(torch.isfinite(v).all() for v in losses.values())))
    if world()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class RunFolderError(ValueError):
    """A run folder holds a run that the command cannot continue."""


def check_resume(run: Path, settings: dict, saved: str, may_change=frozenset(), flag: str = "--run-dir") -> None:
    """A run folder with saved training state resumes only the run that wrote it: `settings` must equal the ones
    saved in `run/saved` (train_args.json, recipe.json) but for the keys in `may_change`. Otherwise the command
    would carry on from weights trained on other data or another model, or change the learning-rate schedule
    part-way, and write a checkpoint whose settings describe neither run."""
    path = run / saved
    if not path.is_file() or not ((run / "state.pt").is_file() or any(run.glob("*.state"))):
        return
    before, now = json.loads(path.read_text()), json.loads(json.dumps(settings))
    changed = [k for k in sorted(set(before) | set(now)) if k not in may_change and before.get(k) != now.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise RunFolderError(
            f"{run} holds a run with other settings ({shown}{'; ...' if len(changed) > 4 else ''}), which this "
            f"command would resume; give another run folder ({flag} NEW) to start afresh, delete {run} to discard "
            f"it, or rerun the command that started it to finish it")


def save_state(path: Path, module, optimizer, step: int) -> None:
    """Atomically write {step, module, optimizer} (rank 0 only)."""
    if world()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "module": module.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, path)


def load_state(path: Path, module, optimizer) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _train_mode(module) -> None:
    """train() for what is trained; modules whose weights are all frozen stay in eval mode (no dropout),
    as BLIP-2 keeps its frozen image encoder and LLM."""
    module.train()
    for child in module.modules():
        weights = list(child.parameters())
        if weights and not any(w.requires_grad for w in weights):
            child.eval()


def _fmt(losses: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in _values(losses).items())


def _autocast(cfg: TrainConfig, module):
    import contextlib

    if cfg.autocast is None:
        return contextlib.nullcontext()
    device = next(module.parameters()).device.type
    return torch.autocast(device, dtype=getattr(torch, cfg.autocast))


class StepLog:
    """Every logged step as one JSON line in `path` (and TensorBoard event files beside it when the tensorboard
    package is installed); rank 0 only."""

    def __init__(self, path: Path | None):
        self.path, self.tb = (Path(path) if path else None), None
        if self.path is None or world()[0] != 0:
            self.path = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, name: str, step: int, values: dict) -> None:
        if self.path is None:
            return
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": name, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{name}/{k}", v, step)
            self.tb.flush()


def _values(losses: dict) -> dict:
    return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in losses.items()}


def _accumulate(objective, module, step: int, cfg: TrainConfig) -> dict:
    """Run the grad_accum micro-batches of `step`, backward each (loss / grad_accum); their mean losses."""
    total = {}
    for k in range(cfg.grad_accum):
        micro = step * cfg.grad_accum + k
        torch.manual_seed(cfg.seed * 1_000_003 + micro)  # dropout and sampling: a function of the micro-step
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + micro)
        with _autocast(cfg, module):
            losses = objective(micro, generator)
        if not _all_finite(losses):
            return losses
        (losses["loss"].float() / cfg.grad_accum).backward()
        for name, v in losses.items():
            total[name] = total.get(name, 0.0) + v.detach().float() / cfg.grad_accum
    return total


def fit(name: str, module, params, objective, cfg: TrainConfig, state_file: Path | None = None,
        progress: bool = True, log_file: Path | None = None) -> int:
    """Run `cfg.steps` optimisation steps of `objective` on `params`; returns the number of steps run now.

    state_file: where the resumable state goes every `cfg.save_every` steps and at the end; if it
    exists, training resumes from it. A NaN/inf loss raises NonFiniteLoss and leaves the last good
    state in place. log_file: a JSONL log of every logged step (StepLog).
    """
    from tqdm.auto import tqdm

    rank, size = world()
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    start = 0
    if state_file is not None and Path(state_file).is_file():
        start = load_state(Path(state_file), module, optimizer)
        logger.info(f"{name}: resuming from {state_file} at step {start}/{cfg.steps}")
    _train_mode(module)
    log = StepLog(log_file)
    bar = tqdm(range(start, cfg.steps), desc=name, disable=not progress or rank != 0, leave=False, mininterval=1.0)
    t0, last_saved = time.time(), start
    images_per_step = cfg.batch_size * cfg.grad_accum * size
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        losses = _accumulate(objective, module, step, cfg)
        if not _all_finite(losses):
            where = f"the last good state is {state_file} (step {last_saved})" if state_file else "nothing was saved"
            raise NonFiniteLoss(
                f"{name}: the loss became non-finite at step {step} ({_fmt(losses)}); {where}. Lower the learning "
                f"rate (--lr) or check the data, then run the same command again to resume from the last good state"
            )
        _average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        done = step + 1
        rate = images_per_step * (done - start) / max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{_fmt(losses)} lr {lr_at(step, cfg):.1e} {rate:.1f} img/s", refresh=False)
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            logger.info(f"{name} step {done}/{cfg.steps} lr {lr_at(step, cfg):.2e} {_fmt(losses)} "
                        f"({(time.time() - t0) / (done - start):.3f}s/step, {rate:.1f} images/s)")
            log.write(name, done, {"lr": lr_at(step, cfg), **_values(losses), "images_per_s": rate})
        if state_file is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            save_state(Path(state_file), module, optimizer, done)
            last_saved = done
    bar.close()
    module.eval()
    return cfg.steps - start


def trainable(model, frozen: tuple[str, ...]) -> list:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(frozen)
        if p.requires_grad:
            params.append(p)
    return params
