"""Text -> image retrieval throughput over a large gallery: the ONNX Runtime pipeline against the same
two-step procedure written in PyTorch on the same model.

    python bench/bench_retrieval.py                        # small preset, stage 1, 10,000 images, k=16 and 128
    python bench/bench_retrieval.py --checkpoint models/demo   # the trained demo model (64x64 images)
    python bench/bench_retrieval.py --gallery 2000 --queries 10 --ks 16
    python bench/bench_retrieval.py --json bench/results/retrieval.json   # the figures, for bench/report.py

The gallery is encoded once (vision + Q-Former queries: ITC features and image embeddings kept for ITM) by the
pipeline, saved and loaded as a user does (its index built: FAISS IVF at this size when the `scale` extra is
installed, exact numpy search without it; image embeddings float16, memory-mapped); the PyTorch side computes its
own ITC features from the same image embeddings (the image tower is not part of a query's cost, and running it
twice over 10,000 images would only double the set-up). That cost is printed, not counted per query. A query then
costs: the text's ITC feature (qformer_text), the ITC similarity against every gallery image (max over queries),
the top k, and ITM on those k (the pipeline: qformer_itm_one_text, one text against the k images; PyTorch:
Blip2Edge.itm_forward on the k (image, text) pairs, as Hugging Face computes ITM; both in chunks of the engine's
max batch, reading the same stored embeddings). The pipeline's ITC step goes through the gallery's index; PyTorch's
is exact, so identical rankings also show that the index found the exact top k. The image tower never runs per
query. Both sides must return the same top-k ranking; the agreement is printed with the queries per second and
their ratio. A third side, PyTorch with the pipeline's re-rank written in PyTorch (`Blip2Edge.itm_one_text`), shows
how much of the ratio is that algorithm and how much the runtime. Each side answers all queries in a block of its
own (two rounds, the order of the blocks alternating): thread pools that keep spinning after a call would otherwise
slow the other side's next query. Last, for each k, the most exact fp32 could gain on this machine: the re-rank's
multiply-adds over this machine's fp32 matmul peak (bench/ceiling.py) against PyTorch's measured time per query, for
the re-rank as built and with each image's cross-attention keys/values stored in the gallery.

The target (docs/testing.md, held on the default small preset): the pipeline answers at least 2x the queries per
second of PyTorch with pair-by-pair ITM, at every k; `--json FILE` writes it beside the figures (`--no-targets`:
the figures alone, for other models).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import ceiling  # noqa: E402
from bench.common import Headline, checkpoint_folder, engine_folder, held_target, timed, write_results  # noqa: E402
from runtime import Blip2Pipeline  # noqa: E402
from runtime.index import ExactIndex  # noqa: E402
from runtime.retrieval import ImageGallery  # noqa: E402
from train.blip2.checkpoint import load_checkpoint  # noqa: E402
from train.shapescaps.synthetic import ShapesCaps  # noqa: E402
from train.blip2.logs import quiet_libraries  # noqa: E402
from train.blip2.reference import HfReference  # noqa: E402


def prepare(preset: str, work: Path, max_batch: int, checkpoint: Path | None = None) -> tuple[Path, Path]:
    ck = checkpoint or checkpoint_folder(work / "checkpoints" / f"bench-{preset}-stage1", preset, stage=1)
    return ck, engine_folder(ck, "onnx", work / "engines", name=f"bench-{ck.name}", max_batch=max_batch)


class TorchRetrieval:
    """The same two-step retrieval in PyTorch (train.blip2.model.Blip2Edge), gallery encoded once. ITM re-ranks the k
    (image, text) pairs as Hugging Face computes them (`itm_forward`), or with `shared=True` through
    `itm_one_text`, the pipeline's re-rank written in PyTorch (the work every image shares done once)."""

    def __init__(self, ck, chunk: int, shared: bool = False):
        self.model, self.chunk, self.tokens = ck.model, chunk, HfReference(ck).qformer_tokens
        self.shared = shared

    @torch.no_grad()
    def encode_gallery(self, image_embeds: np.ndarray):
        self.embeds = torch.from_numpy(image_embeds)
        self.feats = torch.cat([self.model.image_feats(self.model.query_forward(self.embeds[s:s + self.chunk])[0])
                                for s in range(0, len(self.embeds), self.chunk)])

    @torch.no_grad()
    def retrieve(self, text: str, k: int) -> tuple[list[int], dict]:
        """(the top k best first, {image: ITM probability})"""
        ids, mask = self.tokens([text])
        text_feat = self.model.text_feat(ids, mask)  # [1, D]
        itc = (self.feats @ text_feat[0]).amax(1)  # [N]
        top = torch.topk(itc, k).indices
        probs = []
        for s in range(0, k, self.chunk):
            idx = top[s:s + self.chunk]
            n = len(idx)
            if self.shared:
                logits = self.model.itm_one_text(self.embeds[idx], ids, mask)
            else:
                logits, _ = self.model.itm_forward(self.embeds[idx], ids.expand(n, -1), mask.expand(n, -1))
            probs.append(logits.softmax(-1)[:, 1])
        probs = torch.cat(probs)
        order = torch.argsort(probs, descending=True, stable=True)
        return top[order].tolist(), dict(zip(top.tolist(), probs.tolist()))


def gallery_images(n: int, size: int) -> list:
    data = ShapesCaps("val", n=n, image_size=size, seed=1)
    return [data[i].image for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="preset of the random stage-1 model (without --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint (with the Q-Former's text side) instead")
    ap.add_argument("--gallery", type=int, default=10_000, help="gallery size (default 10,000)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--max-batch", type=int, default=32, help="engine max batch = ITM chunk on both sides")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    ap.add_argument("--no-targets", action="store_true", help="write the figures without the target (which is held "
                    "on the default small preset) beside them: for other models, shown for context")
    args = ap.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # as ONNX Runtime does; without it PyTorch is far slower on random weights

    ck_dir, engine = prepare(args.preset, args.work, args.max_batch, args.checkpoint)
    ck = load_checkpoint(ck_dir)
    pipe = Blip2Pipeline.from_dir(engine, shared_pool=True)  # (this process runs nothing else on ONNX Runtime)
    reference = TorchRetrieval(ck, args.max_batch)
    shared = TorchRetrieval(ck, args.max_batch, shared=True)
    images = gallery_images(args.gallery, ck.config.vision_config.image_size)
    queries = [c for i in range(args.queries) for c in ShapesCaps("val", n=args.queries, seed=2)[i].captions[:1]]

    ort_encode, encoded = timed(pipe.encode_gallery, images)
    torch_encode, _ = timed(reference.encode_gallery, encoded.embeds)
    del images
    reranker = "qformer_itm_one_text" if "qformer_itm_one_text" in pipe.runners else "qformer_itm"
    figures = {"model": str(ck_dir), "preset": None if args.checkpoint else args.preset, "gallery": args.gallery,
               "queries": len(queries), "max_batch": args.max_batch, "reranker": reranker,
               "encode_s": {"onnxruntime": ort_encode, "pytorch": torch_encode},
               "itc_max_abs_diff": float(np.abs(encoded.feats - reference.feats.numpy()).max())}
    print(f"model {ck_dir}, gallery {args.gallery} images, {len(queries)} queries")
    print("the pipeline re-ranks with " + (
        reranker if reranker == "qformer_itm_one_text"
        else f"qformer_itm ({engine} was built before qformer_itm_one_text: remove it to rebuild)"))
    print(f"gallery encoding (once): onnxruntime vision + Q-Former {ort_encode:.1f}s; pytorch Q-Former on the same "
          f"image embeddings {torch_encode:.1f}s; ITC features max abs diff {figures['itc_max_abs_diff']:.2g}")
    with tempfile.TemporaryDirectory() as tmp:  # as a user runs it: encoded once, saved, loaded for queries
        t0 = time.perf_counter()
        encoded.save(Path(tmp) / "gallery")
        del encoded
        gallery = ImageGallery.load(Path(tmp) / "gallery")
        figures["index"], figures["index_saved_and_loaded_s"] = gallery.index.describe(), time.perf_counter() - t0
        print(f"index: {figures['index']} (built and saved with the gallery in "
              f"{figures['index_saved_and_loaded_s']:.1f}s); image embeddings kept as {gallery.embeds.dtype}, "
              "memory-mapped")
        reference.embeds = torch.from_numpy(np.asarray(gallery.embeds, dtype=np.float32))  # ITM reads the same
        shared.feats, shared.embeds = reference.feats, reference.embeds
        figures.update(run_queries(pipe, reference, shared, gallery, queries, args.ks))
    if args.json:
        write_results(args.json, f"retrieval: {Path(ck_dir).name}, {args.gallery:,} images", figures,
                      headline(figures, not args.no_targets))


def headline(figures: dict, held: bool) -> list[Headline]:
    """Per k the pipeline's queries/s against PyTorch's (target >= 2x), then the ITC step alone."""
    out = []
    for k, r in figures["ks"].items():
        qps, ceil = r["queries_per_s"], r["ceiling"]["as built (itm_one_text)"]["at_most_x_pytorch"]
        out.append(Headline(
            f"top {k}: onnx pipeline / PyTorch (pair-by-pair ITM), queries/s", r["ratio"], "x",
            *held_target(">=", 2.0, held),
            f"{qps['onnxruntime']:.2f} against {qps['pytorch']:.2f} queries/s; identical rankings "
            f"{r['identical_rankings']}/{figures['queries']}; PyTorch with itm_one_text {qps['pytorch shared']:.2f} "
            f"(pipeline {r['ratio_to_pytorch_shared']:.2f}x that); exact fp32 ceiling at this machine's matmul "
            f"peak {ceil:.2f}x"))
    step = figures["itc_step_ms"]
    kind = next(name for name in step if name != "exact (numpy)")
    out.append(Headline(f"ITC step alone, {kind} index", step[kind], "ms per query",
                        note=f"exact (numpy) {step['exact (numpy)']:.1f} ms per query"))
    return out


def rerank_ceiling(shared, queries, k: int, peak: float, pytorch_seconds: float) -> tuple[str, dict]:
    """The most the pipeline could gain over PyTorch (`pytorch_seconds` per query, measured) in exact fp32 on this
    machine: its re-rank alone, the multiply-adds of Blip2Edge.itm_one_text over k images in the engine's
    chunks, cannot take less than that count over this machine's matmul peak; nor the same with each image's
    cross-attention keys/values stored (bench/ceiling.py). The counts depend on the shapes only: any k images.
    Returns the line printed and its figures."""
    counts = {"as built (itm_one_text)": 0.0, "with stored cross-attention keys/values": 0.0}
    by_length = {}
    for text in queries:
        ids, mask = shared.tokens([text])
        if ids.shape[1] not in by_length:
            chunks = [shared.embeds[s:min(k, s + shared.chunk)] for s in range(0, k, shared.chunk)]
            by_length[ids.shape[1]] = [
                sum(ceiling.multiply_adds(lambda: shared.model.itm_one_text(c, ids, mask)) for c in chunks),
                sum(ceiling.stored_keys_values_multiply_adds(shared.model, c, ids, mask) for c in chunks)]
        for name, n in zip(counts, by_length[ids.shape[1]]):
            counts[name] += n / len(queries)
    figures = {name: {"multiply_adds": n, "min_ms": n / peak * 1000, "at_most_x_pytorch": pytorch_seconds / (n / peak)}
               for name, n in counts.items()}
    return (f"        exact fp32 ceiling at this machine's matmul peak ({peak / 1e9:.1f}G multiply-adds/s): "
            "the re-rank "
            + "; ".join(f"{name} {f['multiply_adds'] / 1e9:.1f}G multiply-adds per query, >= {f['min_ms']:.0f} ms, "
                        f"at most {f['at_most_x_pytorch']:.2f}x pytorch" for name, f in figures.items())), figures


def run_queries(pipe, reference, shared, gallery, queries, ks, rounds: int = 2) -> dict:
    """Each side answers every query in a block of its own, the order of the blocks reversed every other round:
    interleaving single queries let each side's thread pools, which keep spinning for a while after a call
    (ONNX Runtime's shared pool, PyTorch's OpenMP), take a core from the other side's next query. Returns the
    figures printed."""
    peak = ceiling.matmul_peak(threads=2)
    figures = {"rounds": rounds, "matmul_peak_multiply_adds_per_s": peak, "ks": {}, "itc_step_ms": {}}
    for k in ks:
        sides = {"onnxruntime": lambda q: [h.index for h in pipe.retrieve(q, gallery, k=k)],
                 "pytorch": lambda q: reference.retrieve(q, k),
                 "pytorch shared": lambda q: shared.retrieve(q, k)}
        for side in sides.values():
            side(queries[0])  # warm-up
        seconds, results = dict.fromkeys(sides, 0.0), {}
        names = list(sides)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                took, results[name] = timed(lambda: [sides[name](q) for q in queries])
                seconds[name] += took
        got, ref = results["onnxruntime"], results["pytorch"]
        same = same_set = 0
        for g, (r, p) in zip(got, ref):
            same += g == r
            same_set += set(g) == set(r)
            if g != r:
                swapped = [(a, b) for a, b in zip(g, r) if a != b]
                dup = sum(np.array_equal(gallery.embeds[a], gallery.embeds[b]) for a, b in swapped)
                print(f"   differs at {len(swapped)} places; max |ITM prob difference| there "
                      f"{max(abs(p[a] - p[b]) for a, b in swapped):.2g}; identical stored images {dup}/{len(swapped)}")
        qps = {name: rounds * len(queries) / t for name, t in seconds.items()}
        print(f"k={k:4d}: onnxruntime {qps['onnxruntime']:7.2f} queries/s | pytorch {qps['pytorch']:7.2f} queries/s | "
              f"ratio {qps['onnxruntime'] / qps['pytorch']:.2f}x | identical top-{k} rankings {same}/{len(queries)} "
              f"(same {k} candidates {same_set}/{len(queries)}: a different set is the index's, a different "
              f"order of the same set is ITM's)", flush=True)
        same_shared = sum(a[0] == b[0] for a, b in zip(results["pytorch shared"], ref))
        print(f"        pytorch with the pipeline's re-rank (itm_one_text) {qps['pytorch shared']:7.2f} queries/s: "
              f"onnxruntime {qps['onnxruntime'] / qps['pytorch shared']:.2f}x that; its rankings equal "
              f"pytorch's {same_shared}/{len(queries)}", flush=True)
        text, bounds = rerank_ceiling(shared, queries, k, peak, seconds["pytorch"] / (rounds * len(queries)))
        print(text, flush=True)
        figures["ks"][k] = {"queries_per_s": qps, "ratio": qps["onnxruntime"] / qps["pytorch"],
                            "ratio_to_pytorch_shared": qps["onnxruntime"] / qps["pytorch shared"],
                            "identical_rankings": same, "same_candidates": same_set,
                            "pytorch_shared_identical_rankings": same_shared, "ceiling": bounds}
    text_feat = pipe.embed_texts(queries)
    exact = ExactIndex(np.asarray(gallery.feats))
    for name, index in (("exact (numpy)", exact), (gallery.index.kind, gallery.index)):
        took, _ = timed(lambda: [index.search(row, 16) for row in text_feat])
        figures["itc_step_ms"][name] = took / len(queries) * 1000
        print(f"ITC step alone, {name}: {figures['itc_step_ms'][name]:.1f} ms/query")
    return figures


if __name__ == "__main__":
    main()
