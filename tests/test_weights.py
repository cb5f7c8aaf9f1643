"""Converting graphs one weight at a time (export/weights.py): a graph with external data converts to the same
fp16 / int4 graph as the same graph in one file, and its weights are never all in memory at once."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import to_fp16
from export.int4 import to_int4
from export.weights import load_graph


def _graph(path, external: bool, k=64, n=96):
    """x [B, K] -> MatMul(W1 [K, N]) -> Gemm(W2 [N, K] transposed, bias) -> y [B, K]: both weight forms."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "w2", "bias"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data", size_threshold=0)
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("convert", [to_fp16, to_int4], ids=["fp16", "int4"])
def test_external_data_converts_to_the_same_graph_as_one_file(tmp_path, convert):
    (tmp_path / "one").mkdir(), (tmp_path / "ext").mkdir(), (tmp_path / "out").mkdir()
    one = _graph(tmp_path / "one" / "g.onnx", external=False)
    ext = _graph(tmp_path / "ext" / "g.onnx", external=True)
    assert (tmp_path / "ext" / "g.onnx.data").exists() and not (tmp_path / "one" / "g.onnx.data").exists()
    convert(one, tmp_path / "out" / "one.onnx")
    convert(ext, tmp_path / "out" / "ext.onnx")
    # a source with external data gives external data; a one-file source one file
    assert (tmp_path / "out" / "ext.onnx.data").exists() and not (tmp_path / "out" / "one.onnx.data").exists()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    reference = _run(one, x)
    a, b = _run(tmp_path / "out" / "one.onnx", x), _run(tmp_path / "out" / "ext.onnx", x)
    np.testing.assert_array_equal(a, b)
    # and it is still the graph it was converted from (fp16: 11 bits of mantissa; int4: 16 levels per block)
    cosine = float((a * reference).sum() / np.linalg.norm(a) / np.linalg.norm(reference))
    assert cosine > (0.9999 if convert is to_fp16 else 0.98), cosine
    assert np.abs(a - reference).max() > 0  # (it did convert)


def test_weights_are_read_when_needed_not_at_load(tmp_path):
    ext = _graph(tmp_path / "g.onnx", external=True)
    model, weights = load_graph(ext)
    assert all(len(t.raw_data) == 0 for t in model.graph.initializer)  # stubs: nothing held
    w1 = numpy_helper.to_array(onnx.load(str(ext)).graph.initializer[0])
    np.testing.assert_array_equal(weights.array("w1"), w1)


def test_a_truncated_data_file_names_the_file_and_the_fix(tmp_path):
    ext = _graph(tmp_path / "g.onnx", external=True)
    data = tmp_path / "g.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"g\.onnx\.data ends before .* truncated; export the graph again"):
        to_fp16(ext, tmp_path / "fp16.onnx")


def test_int4_quantizes_a_head_tied_to_the_embedding_table(tmp_path):
    """OPT's LM head reads the embedding table through a Transpose: int4 gives the head quantized weights of its
    own (the decode step reads the head's weights every token; 8-bit blocks, it sets every logit) and leaves the
    lookup reading the float table."""
    rng = np.random.default_rng(0)
    vocab, width = 128, 64
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="head_t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", vocab])],
                              [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "g.onnx"))
    report = to_int4(tmp_path / "g.onnx", tmp_path / "q.onnx")
    nodes = onnx.load(str(tmp_path / "q.onnx")).graph.node
    assert report["quantized_nodes"] == 1 and [n.op_type for n in nodes] == ["Gather", "MatMulNBits"], nodes
    bits = {a.name: a.i for a in nodes[1].attribute}["bits"]
    assert bits == report["logits_product"]["bits"] == 8  # the head computing `logits` gets 8-bit blocks
    ids = np.arange(vocab, dtype=np.int64)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"ids": ids})[0], table @ table.T
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999 and np.abs(got - want).max() > 0


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_int4_of_a_large_weight_in_column_blocks_is_the_whole_weights(tmp_path, monkeypatch, symmetric):
    """A weight over export.int4.COLUMN_BLOCK_BYTES goes through ONNX Runtime's quantizer a block of columns at a
    time (the quantizer copies its float weight twice: an LM head's whole 0.8 GB set a build's peak); the graph
    it gives is byte for byte the one quantizing each weight whole gives, with zero points too, int4 and the
    8-bit head (a block joined along the wrong axis or N left at the block's width would differ or not load)."""
    import export.int4 as int4

    rng = np.random.default_rng(0)
    k, n, vocab = 64, 300, 200
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((n, vocab)).astype(np.float32), "head")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "g.onnx"))
    to_int4(tmp_path / "g.onnx", tmp_path / "whole.onnx", symmetric=symmetric)
    monkeypatch.setattr(int4, "COLUMN_BLOCK_BYTES", 4 * k * 128)  # w: 128, 128, 44 columns; head: 27 a block
    to_int4(tmp_path / "g.onnx", tmp_path / "blocks.onnx", symmetric=symmetric)
    whole, blocks = onnx.load(str(tmp_path / "whole.onnx")), onnx.load(str(tmp_path / "blocks.onnx"))
    assert [n.op_type for n in blocks.graph.node] == ["MatMulNBits", "MatMulNBits"]
    assert [helper.printable_node(n) for n in blocks.graph.node] == [helper.printable_node(n) for n in whole.graph.node]
    assert {a.name: helper.get_attribute_value(a) for a in blocks.graph.node[1].attribute}["bits"] == 8
    got = {t.name: numpy_helper.to_array(t) for t in blocks.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    assert got.keys() == want.keys() and len(want) == (4 if symmetric else 6)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "blocks.onnx", x), _run(tmp_path / "whole.onnx", x))
