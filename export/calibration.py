"""Real inputs for every graph, from the fp32 pipeline: INT8 calibration and reduced-precision parity.

Random tensors are fine to check an fp32 export, but an INT8 graph is only right for inputs like the
ones it was calibrated on, so calibration and the reduced-precision parity gate use what the runtime
really feeds each graph: the fp32 engine folder is opened with `Blip2Pipeline` through a runner factory
that wraps every runner, and the pipeline captions, answers, embeds and matches a set of images through its
public API. For the gate a `RecordingRunner` keeps every call's feeds; for calibration a `RangeRunner` runs the
graph's calibration copy and keeps only the min and max of each tensor to quantize.

    from export.calibration import calibration_images, record_feeds, record_ranges
    data = calibration_images(None, image_size=224, count=64, seed=0)        # ShapesCaps
    feeds = record_feeds("engines/.partial/fp32", data.images, data.texts)  # {"vision": [{...}, ...], ...}
    ranges = record_ranges("engines/.partial/fp32", {"vision": ["layer_norm", ...]}, data.images)

Calibration images come from `--calib-images DIR` (every .png/.jpg/.jpeg/.bmp/.webp in it, sorted by
name; the last four are held out, the first `count` of the rest calibrate) or, by default, from the
synthetic ShapesCaps training split with its captions (held out: its val split). The parity gate of a
reduced-precision build runs on the held-out images: inputs of the kind the graphs were calibrated for,
which the calibration never saw.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ImageInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Texts for the Q-Former text graphs when the calibration images have none and the model cannot caption
GENERIC_TEXTS = [
    "a photo of a cat sitting on a sofa", "a red car parked on the street", "two people walking on a beach",
    "a plate of food on a wooden table", "a small blue circle on the left", "a green square at the top",
    "a dog running in the grass", "a city skyline at night", "an orange triangle above a yellow square",
    "a bowl of fruit", "a man riding a bicycle", "a white bird on a branch",
]
PROMPTS = [None, "a photo of", "Question: what is in the picture? Answer:", "Question: what color is it? Answer:"]


@dataclass
class ImageSet:
    """Calibration images and held-out images of the same kind (the gate's inputs), with texts when known."""
    images: list
    texts: list[str] | None
    held_out: list
    held_out_texts: list[str] | None
    report: list  # held-out images for the accuracy report against fp32
    source: dict  # for the manifest: where the images come from, how many, the seed


HELD_OUT = 4  # images kept out of calibration for the parity gate (batch 3, then batch 1)


def check_calibration(folder, count: int, report: int) -> list[Path]:
    """What calibration_images refuses, checked by export.build before any export starts: a count and report size
    of 1 or more, and a folder (where given) with enough images. Returns the folder's images, sorted by name."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ImageInputError(f"--calib-count {count!r}: give 1 or more calibration images (default 64)")
    if isinstance(report, bool) or not isinstance(report, int) or report < 1:
        raise ImageInputError(f"--report-images {report!r}: give 1 or more images for the accuracy report "
                              f"(default 16)")
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"--calib-images {folder} is not a folder; pass a folder of .png/.jpg images like the "
                              f"ones the model will see in deployment")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < HELD_OUT + 1:
        raise ImageInputError(f"--calib-images {folder} holds {len(paths)} images ({', '.join(IMAGE_SUFFIXES)}); "
                              f"give at least {HELD_OUT + 1} (a few dozen is better) like the ones the model will see "
                              f"in deployment: {HELD_OUT} are held out to check the INT8 graphs")
    return paths


def calibration_images(folder, image_size: int, count: int, seed: int = 0, report: int = 16) -> ImageSet:
    """`count` calibration images and HELD_OUT others from the same source: the ShapesCaps train and val
    splits by default (`report` val images for the accuracy report), else the folder's images (the last
    HELD_OUT of it, sorted by name, are held out, and are the report's images)."""
    paths = check_calibration(folder, count, report)
    if folder is None:
        from train.shapescaps.synthetic import ShapesCaps

        train = list(ShapesCaps("train", n=count, image_size=image_size, seed=seed))
        val = list(ShapesCaps("val", n=max(HELD_OUT, report), image_size=image_size, seed=seed))
        return ImageSet([s.image for s in train], [s.captions[0] for s in train], [s.image for s in val[:HELD_OUT]],
                        [s.captions[0] for s in val[:HELD_OUT]], [s.image for s in val[:report]],
                        {"source": "ShapesCaps train split (synthetic)", "count": count, "seed": seed,
                         "held_out": f"{HELD_OUT} images of the ShapesCaps val split",
                         "report": f"{report} images of the ShapesCaps val split"})
    folder = Path(folder)
    held_out, paths = paths[-HELD_OUT:], paths[:-HELD_OUT][:count]
    return ImageSet(paths, None, held_out, None, held_out,
                    {"source": str(folder.resolve()), "count": len(paths), "seed": None,
                     "held_out": f"the last {HELD_OUT} images of the folder, by name",
                     "report": f"the last {HELD_OUT} images of the folder, by name"})


class RecordingRunner:
    """Wraps a runner: forwards every call and keeps a copy of its feeds."""

    def __init__(self, runner):
        self.runner = runner
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds, keep=()):
        self.feeds.append({n: np.array(feeds[n]) for n in self.input_names})
        return self.runner.run(feeds, keep)


def _exercise(pipe, images: list, texts: list[str] | None, max_new_tokens: int) -> None:
    """Run every capability the folder has, so that every graph sees realistic inputs."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    if "llm_decoder" in pipe.runners:
        pipe.generate_ids(images, prompt=prompts, max_new_tokens=max_new_tokens)
    if "qformer_itg" in pipe.runners:
        generated = pipe.generate(images, decoder="qformer", max_new_tokens=max_new_tokens)
        texts = texts or [t for t in generated if t.strip()] or None
    if "qformer_text" in pipe.runners or "qformer_itm" in pipe.runners:
        texts = texts or GENERIC_TEXTS
        texts = [texts[i % len(texts)] for i in range(len(images))]
        if "qformer_text" in pipe.runners:
            pipe.embed_texts(texts)
            pipe.embed_images(images)
        if "qformer_itm" in pipe.runners:
            pipe.itm(images, texts)
            if "llm_decoder" in pipe.runners:  # question-aware soft prompts
                pipe.generate_ids(images[:pipe.max_batch], prompt=prompts[:pipe.max_batch],
                                  qformer_text=texts[:pipe.max_batch], max_new_tokens=2)
        if "qformer_itm_one_text" in pipe.runners:  # text -> image retrieval's re-rank
            gallery = pipe.encode_gallery(images)
            for text in dict.fromkeys(texts[:4]):
                pipe.retrieve(text, gallery, k=len(images))
        if "qformer_itm_one_image" in pipe.runners:  # image -> text
            for image in images[:4]:  # (each text twice: one image against at least two texts)
                pipe.itm(image, list(dict.fromkeys(texts)) * 2)


def record_feeds(folder, images: list, texts: list[str] | None = None, max_new_tokens: int = 16) -> dict:
    """{graph name: [feeds of each call]} from running the fp32 pipeline of `folder` on `images`."""
    from export.parity import check_runner

    recorders = {}

    def recording(path, graph):
        recorders[graph] = RecordingRunner(check_runner(path))
        return recorders[graph]

    _run_pipeline(folder, recording, images, texts, max_new_tokens)
    return {name: r.feeds for name, r in recorders.items()}


def record_ranges(folder, tensors: dict[str, list[str]], images: list, texts: list[str] | None = None,
                  max_new_tokens: int = 16, channels: dict[str, list[str]] | None = None) -> dict:
    """{graph name: {tensor: largest magnitude}} for the `tensors` of each graph (`export.int8.int8_plan_of`),
    measured while the fp32 pipeline of `folder` runs on `images`: each graph runs as a copy that also outputs
    those tensors' min and max, so no feed is kept (a full-size LLM's recorded KV caches would need gigabytes).
    `channels`: per graph, tensors whose per-channel maxima are measured too (export/smoothing.py)."""
    from export.parity import check_runner
    from export.int8 import RangeRunner

    runners = {}

    def measuring(path, graph):
        if not tensors.get(graph):
            return check_runner(path)
        runners[graph] = RangeRunner(path, tensors[graph], (channels or {}).get(graph, ()))
        return runners[graph]

    _run_pipeline(folder, measuring, images, texts, max_new_tokens)
    return {graph: r.ranges.symmetric() for graph, r in runners.items()}


def _run_pipeline(folder, runner_factory, images: list, texts: list[str] | None, max_new_tokens: int) -> None:
    """Open the fp32 folder with `runner_factory` and exercise every graph on `images`, a batch at a time, handing
    the freed heap back between batches (ONNX Runtime's per-call buffers otherwise pile up in glibc's heap: on the
    677M variant, 64 calibration images peaked 0.25 GB above one batch of 8)."""
    from runtime import Blip2Pipeline
    from runtime.memory import return_freed_memory

    pipe = Blip2Pipeline.from_dir(folder, backend="onnxruntime", runner_factory=runner_factory)
    limits = pipe.manifest.limits
    max_new_tokens = min(max_new_tokens, limits.max_new_tokens or max_new_tokens)
    if pipe.itg is not None:
        max_new_tokens = min(max_new_tokens, limits.max_qformer_tokens - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # texts cut to the engine's limit: the same cut the runtime applies
        for start in range(0, len(images), pipe.max_batch):
            part = slice(start, start + pipe.max_batch)
            _exercise(pipe, images[part], texts[part] if texts else None, max_new_tokens)
            return_freed_memory()
