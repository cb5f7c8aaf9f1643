"""What each int4 setting of ONNX Runtime's weight-only quantizer costs one matrix product (no model needed).

    python bench/bench_int4_error.py                 # OPT-2.7B's width (2560 x 2560), random N(0, 0.02) weights
    python bench/bench_int4_error.py --width 4096

One MatMul with Gaussian weights (what a random-weight checkpoint holds) is quantized with
`MatMulNBitsQuantizer` / `DefaultWeightOnlyQuantConfig` at every block size, symmetric or not, and both
accuracy levels (4: int8 activations, MLAS's fast path; 0: float32), then run by ONNX Runtime on 64 random
inputs; printed: the output's relative error against float32 and the mean cosine. This is the per-layer
error behind `export/precision.py`'s INT4_BLOCK_SIZE: stacked over a 32-layer LLM it sets the teacher-forced
logit cosine `bench/bench_engines.py` reports for an onnx-int4 folder.
"""
import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 64, 32, 16])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.width, args.width)) * 0.02).astype(np.float32)
    x = rng.standard_normal((64, args.width)).astype(np.float32)
    model, ref = matmul_model(weight), x @ weight
    print("block | symmetric | accuracy_level | relative error | cosine")
    for block in args.blocks:
        for symmetric in (True, False):
            for level in (4, 0):
                err, cos = error(model, x, ref, block, symmetric, level)
                print(f"{block:5d} | {symmetric!s:9} | {level:14d} | {err:14.4f} | {cos:.5f}", flush=True)


if __name__ == "__main__":
    main()
