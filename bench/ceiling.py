"""How fast exact fp32 ITM could be on this machine: its fp32 matrix-product peak, and the multiply-adds of the
re-rank, as computed and with each image's cross-attention keys/values stored in the gallery instead of its ViT
output. bench_retrieval.py and bench_itm.py print the bounds these give; bench_itm.py also times the
stored-keys/values re-rank, exported here (export_stored_keys_values).

A re-rank that does M multiply-adds cannot take less than M / peak seconds, so against a reference measured at
T seconds it is at most T / (M / peak) times faster, whatever the runtime does around the matrix products.
"""
import time
import warnings
from unittest import mock

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch.utils.flop_counter import FlopCounterMode

import train.blip2.model as edge_model
from runtime.ort_runner import session_options


def matmul_peak(threads: int, n: int = 2048, rounds: int = 5) -> float:
    """This machine's fp32 matrix-product rate in multiply-adds per second: ONNX Runtime's MatMul of two n x n
    matrices on `threads` threads with the runtime's session options, the best of `rounds` (the rate BLAS-sized
    products reach; the re-rank's products are smaller, so this is an upper bound on what they can reach)."""
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = session_options(threads)  # the runtime's (the shared pool's threads once a pipeline opened it)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {name: np.random.default_rng(0).random((n, n), np.float32) for name in "ab"}
    session.run(None, feeds)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return n ** 3 / best


def multiply_adds(run) -> float:
    """Multiply-adds of run() as PyTorch's FlopCounterMode counts them (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops() / 2


class StoredKeysValuesItm(torch.nn.Module):
    """Blip2Edge.itm_one_text reading each image's cross-attention keys and values (computed at indexing time and
    stored in the gallery) instead of folding the key/value projections into the queries' side: the fewest
    multiply-adds a query's exact fp32 re-rank could do, for 4x the gallery's bytes at the small preset (6.5x at
    ViT-g). forward(input_ids [1,T], attention_mask [1,T], keys, values, ... [B,H,Np,d] per cross-attention layer)
    -> itm_logits [B, 2], the same as itm_one_text's."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.blocks = [layer.crossattention for layer in model.qformer.encoder.layer if layer.has_cross_attention]

    def keys_values(self, image_embeds) -> list[torch.Tensor]:
        """What the gallery would store: [keys, values, ...] of every cross-attention layer, [B, H, Np, d] each."""
        with torch.no_grad():
            return [edge_model._split_heads(proj(image_embeds), block.attention.attention_head_size)
                    for block in self.blocks for proj in (block.attention.key, block.attention.value)]

    def forward(self, input_ids, attention_mask, *keys_values):
        stored = {id(block): keys_values[2 * i: 2 * i + 2] for i, block in enumerate(self.blocks)}

        def cross_from_stored(block, x, _):
            att = block.attention
            keys, values = stored[id(block)]
            q = edge_model._split_heads(att.query(x), att.attention_head_size)
            return block.output(edge_model._attend(att, q, keys, values, None), x)

        with mock.patch.object(edge_model, "cross_attention_absorbed", cross_from_stored):
            # itm_one_text reads only the batch size of its image_embeds when cross-attention is replaced
            return self.model.itm_one_text(keys_values[0][:, 0], input_ids, attention_mask)


def stored_keys_values_multiply_adds(model, image_embeds, input_ids, attention_mask) -> float:
    """Multiply-adds of StoredKeysValuesItm (computing the stored keys/values not counted); meta tensors work."""
    itm = StoredKeysValuesItm(model)
    stored = itm.keys_values(image_embeds)
    return multiply_adds(lambda: itm(input_ids, attention_mask, *stored))


def export_stored_keys_values(model, image_embeds, input_ids, attention_mask, path) -> list[np.ndarray]:
    """Export StoredKeysValuesItm at these shapes (static: the most favourable case for it) to `path`, GELU in
    the form ONNX Runtime fuses as in an engine's graphs; returns the stored keys/values of image_embeds."""
    import onnx

    from export.onnx_export import OPSET, gelu_for_fusion

    itm = StoredKeysValuesItm(model).eval()
    stored = itm.keys_values(image_embeds)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(itm, (input_ids, attention_mask, *stored), dynamo=True, opset_version=OPSET,
                                    verbose=False)
    program.save(str(path))
    graph = onnx.load(str(path))
    gelu_for_fusion(graph.graph)
    onnx.save(graph, str(path))
    return [t.numpy() for t in stored]
