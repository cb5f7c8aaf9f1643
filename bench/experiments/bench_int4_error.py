"""What each int4 setting of ONNX Runtime's weight-only quantizer costs one matrix product (no model needed).

    python bench/experiments/bench_int4_error.py             # OPT-2.7B's width (2560 x 2560), random N(0, 0.02) weights
    python bench/experiments/bench_int4_error.py --width 4096
    python bench/experiments/bench_int4_error.py --model checkpoints/blip2-opt-2.7b-6l
                                                             # which LLM layers carry the error

One MatMul with Gaussian weights (what a random-weight checkpoint holds) is quantized with
`MatMulNBitsQuantizer` / `DefaultWeightOnlyQuantConfig` at every block size, symmetric or not, and both
accuracy levels (4: int8 activations, MLAS's fast path; 0: float32), then run by ONNX Runtime on 64 random
inputs; printed: the output's relative error against float32 and the mean cosine. This is the per-layer
error behind `export/int4.py`'s INT4_BLOCK_SIZE: stacked over a 32-layer LLM it sets the teacher-forced
logit cosine `bench/bench_engines.py` reports for an onnx-int4 folder.

With `--model`, a checkpoint's LLM is quantized one layer at a time (the same symmetric round-to-nearest blocks,
simulated in PyTorch: the Gaussian matrix's error is printed both ways to show they agree) and the teacher-forced
logit cosine against float32 is printed per layer (greedy captions of random images, the LM head float): the
figures behind `export/int4.py`'s INT4_EIGHT_BIT_LAYERS.
"""
import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
logging.getLogger().setLevel(logging.WARNING)  # (importing the quantizer turns the root logger to INFO)


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def error(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, block: int, symmetric: bool, level: int):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, accuracy_level=level, bits=4))
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    cos = np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref)), float(cos.mean())


def fake_quant(w, block: int = 32, bits: int = 4):
    """Symmetric round-to-nearest blocks along the input dimension of a [out, in] weight, as ONNX Runtime's
    quantizer rounds them (the block's largest magnitude maps to -2^(bits-1))."""
    import torch

    blocks = w.reshape(w.shape[0], -1, block)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    scale = peak / -(2 ** (bits - 1))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(blocks / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).reshape(w.shape)


def layer_cosines(model_dir: str, block: int, images: int = 4, new_tokens: int = 16) -> None:
    import torch
    from transformers import Blip2ForConditionalGeneration

    from export.int4 import LAYER_PATTERN  # the same layer names the int4 build reads

    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    size, queries = model.config.vision_config.image_size, model.config.num_query_tokens
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.full((images, queries), model.config.image_token_index)  # as Blip2Processor lays them out
    if model.config.use_decoder_only_language_model:
        ids = torch.cat([ids, torch.full((images, 1), model.config.text_config.bos_token_id)], 1)

    @torch.no_grad()
    def logits(tokens=None):
        if tokens is None:
            tokens = model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
        if model.config.use_decoder_only_language_model:
            full = tokens if tokens.shape[1] > ids.shape[1] else torch.cat([ids, tokens], 1)
            return tokens, model(pixel_values=pixels, input_ids=full).logits[:, ids.shape[1] - 1:-1]
        return tokens, model(pixel_values=pixels, input_ids=ids, decoder_input_ids=tokens).logits
    tokens, ref = logits()
    weights = {n: p for n, p in model.language_model.named_parameters()
               if p.ndim == 2 and LAYER_PATTERN.search(n) and "embed" not in n}
    layer_of = {n: int(LAYER_PATTERN.search(n).group(1)) for n in weights}
    original = {n: p.detach().clone() for n, p in weights.items()}
    print("layer | weight products | teacher-forced logit cosine, that layer alone int4 (mean / min)")
    for index in sorted(set(layer_of.values())):
        with torch.no_grad():
            for n, p in weights.items():
                p.copy_(fake_quant(original[n], block) if layer_of[n] == index else original[n])
        cos = torch.nn.functional.cosine_similarity(logits(tokens)[1], ref, dim=-1)
        count = list(layer_of.values()).count(index)
        print(f"{index:5d} | {count:15d} | {cos.mean():.5f} / {cos.min():.5f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 64, 32, 16])
    ap.add_argument("--model", help="a checkpoint folder: the logit cosine with one LLM layer at a time in int4")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.width, args.width)) * 0.02).astype(np.float32)
    x = rng.standard_normal((64, args.width)).astype(np.float32)
    model, ref = matmul_model(weight), x @ weight
    if args.model:
        import torch

        simulated = x @ fake_quant(torch.from_numpy(weight.T.copy()), 32).numpy().T
        print(f"blocks of 32, symmetric: relative error {error(model, x, ref, 32, True, 0)[0]:.4f} with ONNX "
              f"Runtime, {np.linalg.norm(simulated - ref) / np.linalg.norm(ref):.4f} simulated")
        layer_cosines(args.model, 32)
        return
    print("block | symmetric | accuracy_level | relative error | cosine")
    for block in args.blocks:
        for symmetric in (True, False):
            for level in (4, 0):
                err, cos = error(model, x, ref, block, symmetric, level)
                print(f"{block:5d} | {symmetric!s:9} | {level:14d} | {err:14.4f} | {cos:.5f}", flush=True)


if __name__ == "__main__":
    main()
