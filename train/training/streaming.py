"""Images streamed from disk into training steps: worker processes decode and preprocess, the step runs the ViT.

    from train.training.streaming import ImageStream
    stream = ImageStream(data, preprocess, batch_size=32, seed=0, workers=2)   # data: train.training.datasets.Dataset
    batch = stream.batch(step)      # {"index": [B] example ids, "pixels": [B,3,H,W] float32, "keys": [...]}

Order: the examples are shuffled once per epoch by a permutation drawn from (seed, epoch); micro-step s
of process r takes the r-th slice of the s-th block of `batch_size * world` examples (the last partial
block of an epoch is dropped). Which images a step sees is therefore a pure function of (seed, step,
rank, world): a run resumed at step s reads exactly what an uninterrupted one reads.

Images are read and preprocessed in `workers` DataLoader processes with the runtime's own numpy
preprocessing (`runtime.image.ImageProcessorConfig`, bit-identical to Hugging Face's BlipImageProcessor),
so training sees what the deployed pipeline sees. Nothing is kept: memory does not grow with the data.
An image that cannot be decoded is replaced in its batch by another image of the batch (its key marks
the repeat, so ITC does not treat the copy as a negative) and counted; past `max_bad` the run stops with
the list.

`FeatureCache` keeps a frozen ViT's outputs in float16 in a memory-mapped file under the run folder, so
epochs after the first skip decoding and the ViT (for many epochs over data that fits the disk).
"""
import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from train.training.datasets import DataError


class StepOrder:
    """The example ids of every process's batch at every micro-step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, world: int = 1):
        self.n, self.batch_size, self.seed, self.world = n, batch_size, seed, world
        self.block = batch_size * world
        if n < self.block:
            raise DataError(f"the data has {n} usable examples, fewer than one step takes ({batch_size} per process x "
                            f"{world} processes); lower --batch-size or add data")
        self.steps_per_epoch = n // self.block
        self._epoch, self._perm = -1, None

    def indices(self, step: int, rank: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = pos * self.block + rank * self.batch_size
        return self._perm[start:start + self.batch_size]


class _Steps(torch.utils.data.Sampler):
    """Batches of example ids from micro-step `start` on, without end (DataLoader batch_sampler)."""

    def __init__(self, order: StepOrder, rank: int, start: int):
        self.order, self.rank, self.start = order, rank, start

    def __iter__(self):
        for step in itertools.count(self.start):
            yield [int(i) for i in self.order.indices(step, self.rank)]


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, data, preprocess, cached=None):
        self.data, self.preprocess, self.cached = data, preprocess, cached

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if self.cached is not None and self.cached[index]:
            return index, None, None
        try:
            return index, self.preprocess([self.data.load(index)])[0], None
        except DataError as e:
            return index, None, str(e)


def _collate(items):
    return [i for i, _, _ in items], [p for _, p, _ in items], [e for _, _, e in items]


class FeatureCache:
    """A frozen ViT's outputs [N, Np, Dv] in float16, memory-mapped under `folder` (filled as steps compute them)."""

    def __init__(self, folder: Path, n: int, shape: tuple[int, int], fingerprint: str):
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "features.json"
        fresh = not meta.is_file() or meta.read_text() != f"{fingerprint} {n} {shape}"
        mode = "w+" if fresh else "r+"
        self.features = np.lib.format.open_memmap(folder / "features.npy", mode, np.float16, (n, *shape))
        self.filled = np.lib.format.open_memmap(folder / "filled.npy", mode, np.bool_, (n,))
        if fresh:
            self.filled[:] = False
            meta.write_text(f"{fingerprint} {n} {shape}")

    def get(self, index) -> torch.Tensor:
        return torch.from_numpy(self.features[index].astype(np.float32))

    def put(self, index, embeds: torch.Tensor) -> None:
        self.features[index] = embeds.detach().float().numpy().astype(np.float16)
        self.filled[index] = True


class ImageStream:
    """Batches of (example ids, preprocessed pixels) per micro-step, read ahead by `workers` processes."""

    def __init__(self, data, preprocess, batch_size: int, seed: int, workers: int = 2, rank: int = 0,
                 world: int = 1, max_bad: int = 0, cache: FeatureCache | None = None):
        self.data, self.preprocess, self.workers, self.rank, self.max_bad = data, preprocess, workers, rank, max_bad
        self.order = StepOrder(len(data), batch_size, seed, world)
        self.cache = cache
        self.bad: dict[int, str] = {}  # example id -> why it could not be read
        self._iter, self._next = None, None

    def keys(self, index) -> list[str]:
        return [self.data.examples[int(i)].image for i in index]

    def every_rank(self, step: int) -> np.ndarray:
        """The example ids of every process's batch at `step`, rank by rank."""
        return np.concatenate([self.order.indices(step, r) for r in range(self.order.world)])

    def _start(self, step: int) -> None:
        sampler = _Steps(self.order, self.rank, step)
        pixels = _Pixels(self.data, self.preprocess, self.cache.filled if self.cache is not None else None)
        # its own generator: a DataLoader otherwise draws its workers' seed from torch's global one, and a run
        # resumed at step s would then see other dropout masks than an uninterrupted run
        self._iter = iter(DataLoader(pixels, batch_sampler=sampler, num_workers=self.workers, collate_fn=_collate,
                                     prefetch_factor=4 if self.workers else None,
                                     generator=torch.Generator().manual_seed(self.order.seed)))
        self._next = step

    def batch(self, step: int) -> dict:
        """Micro-step `step`'s batch: {"index": [B] example ids, "keys": their image names, "fresh": [B] bool, rows
        read from disk (the rest are in the feature cache), "pixels": [fresh rows, 3, H, W] float32}."""
        if self._iter is None or self._next != step:
            self._start(step)
        index, pixels, errors = next(self._iter)
        self._next = step + 1
        index = self._replace_bad(index, pixels, errors)
        fresh = np.array([p is not None for p in pixels])
        batch = {"index": np.asarray(index), "keys": self.keys(index), "fresh": fresh}
        if fresh.any():
            batch["pixels"] = torch.from_numpy(np.stack([p for p in pixels if p is not None]))
        return batch

    def image_embeds(self, model, batch: dict, train_vit: bool = False) -> torch.Tensor:
        """[B, Np, Dv]: the ViT's outputs of the batch (computed for fresh rows, read from the cache for the rest;
        fresh rows are cached when the ViT is frozen)."""
        fresh, index = batch["fresh"], batch["index"]
        embeds = None
        if fresh.any():
            with torch.set_grad_enabled(train_vit and torch.is_grad_enabled()):
                vit = model.encode_image(batch["pixels"].to(model.query_tokens.device,
                                                            next(model.vision_model.parameters()).dtype)).float()
            if fresh.all():
                return self._cache_put(index, vit, train_vit)
            self._cache_put(index[fresh], vit, train_vit)
            embeds = torch.empty(len(index), *vit.shape[1:], device=vit.device)
            embeds[torch.from_numpy(fresh)] = vit
        cached = self.cache.get(index[~fresh]).to(model.query_tokens.device)
        if embeds is None:
            return cached
        embeds[torch.from_numpy(~fresh)] = cached
        return embeds

    def _cache_put(self, index, embeds: torch.Tensor, train_vit: bool) -> torch.Tensor:
        if self.cache is not None and not train_vit:
            self.cache.put(index, embeds)
        return embeds

    def _replace_bad(self, index: list, pixels: list, errors: list) -> list:
        good = [k for k, e in enumerate(errors) if e is None]
        for k, e in enumerate(errors):
            if e is not None:
                self.bad[index[k]] = e
        if len(self.bad) > self.max_bad:
            first = "; ".join(list(self.bad.values())[:3])
            raise DataError(f"{len(self.bad)} images could not be decoded ({first}); fix or remove them, or allow up "
                            f"to N unreadable images with --max-bad N")
        if not good:
            raise DataError(f"no image of a batch could be decoded: {errors[0]}")
        for k, e in enumerate(errors):
            if e is not None:  # another image of the batch takes its place (same key: not a negative of itself)
                src = good[k % len(good)]
                index[k], pixels[k] = index[src], pixels[src]
        return index
