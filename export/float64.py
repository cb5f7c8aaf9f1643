"""PyTorch's float32 modules computed in float64, without a float64 copy of their weights: the truth the fp32 gate
measures rounding against.

    from export.float64 import float64
    with float64():
        logits = model(pixel_values=...)       # every float32 operand widened to float64, op by op

A float32 run and a float64 run of the same module differ by PyTorch's own float32 rounding; the fp32 gate
(`export/parity.py`) allows an exported graph that much error, times a stated margin, because that rounding grows
with the width, depth and activations of the model (a 2048-wide product rounds more than a 32-wide one) and no
fixed bound fits every model users deploy. `model.double()` would hold a second, twice as large copy of the
weights: at Flan-T5-XL's or OPT-6.7B's size that is more memory than the build has. Here each weight is widened
while the operation that reads it runs and is dropped after it, so the extra memory is one operation's operands.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

_aten = torch.ops.aten
# Operations that only move values (a row gather of the embedding table): exact in float32, widened after, so the
# table itself is never copied.
_EXACT = {_aten.embedding.default}


def _widen(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.float64)
    if value is torch.float32:  # a dtype argument: what the module casts to or creates
        return torch.float64
    return value


# Python-level calls that only move or gather values (an embedding lookup, a slice of a weight): run on the float32
# tensor and their result widened, so a large table is never widened whole (exact: no arithmetic).
_MOVES = {"embedding", "__getitem__", "narrow", "select", "view", "reshape", "t", "transpose", "permute",
          "contiguous", "expand", "unsqueeze", "squeeze", "flatten"}

# Calls that read a tensor's metadata (`param.device`, `.shape`, `.dtype`, `.numel()`): run on the float32 tensor,
# never widening it. Hugging Face's `model.device` reads the first parameter's device at every generate step, and
# widening that parameter (OPT-6.7B's 50272 x 4096 embedding table: 1.6 GB in float64) to read it put 3 GB on the
# float64 reference's peak. A float32 dtype read here still answers float64, as the widened tensor would.
_METADATA = {"__get__", "numel", "dim", "size", "stride", "is_floating_point", "is_contiguous", "element_size",
             "data_ptr", "get_device", "__len__"}

# A weight larger than this is widened a block of output rows at a time: an LM head of 50272 x 4096 (OPT-6.7B) is
# 0.82 GB in float32, and widened whole it would add 1.65 GB to the build's peak. At Flan-T5-XL's widths, when the
# gate's 4 images went through ViT-g's float64 MLP and attention together (before `rows_apart`), a 64 MiB block
# (ViT-g's 6144 x 1408 fc1 and fc2, its qkv widened whole) added 0.07 GiB over a 16 MiB one (2.55 -> 2.49 GiB).
CHUNK_BYTES = 16 * 2**20


def _linear_in_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float64 with `weight` widened `CHUNK_BYTES` of rows at a time (each output element is one row's
    dot product, computed as it would be whole), each block's result written into the output (concatenating the
    blocks would hold the output twice)."""
    rows = max(1, CHUNK_BYTES // (8 * weight.shape[1]))
    x = _widen(x)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for i in range(0, weight.shape[0], rows):
        out[..., i:i + rows] = torch.nn.functional.linear(x, _widen(weight[i:i + rows]),
                                                          None if bias is None else _widen(bias[i:i + rows]))
    return out


class _Float64Functions(TorchFunctionMode):
    """Python-level calls (F.conv2d, F.linear, Tensor methods): their float32 operands widened before PyTorch's
    composite operations check that input and weight types agree."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _METADATA or getattr(func, "__name__", "") in _MOVES:
            # metadata, or exact in float32: widened after (a float32 dtype answers float64), the source never copied
            return tree_map(_widen, func(*args, **kwargs))
        if func is torch.nn.functional.linear:
            x, weight, bias = (list(args) + [kwargs.get("weight"), kwargs.get("bias")])[:3] if len(args) < 3 \
                else args[:3]
            if weight is not None and weight.dtype == torch.float32 and weight.numel() * 8 > CHUNK_BYTES:
                return _linear_in_blocks(x, weight, bias)
        name = getattr(func, "__name__", "")
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
            first, (rest, kwargs) = args[0], tree_map(_widen, (args[1:], kwargs))
            return func(first, *rest, **kwargs)  # in place: the first operand stays the caller's tensor
        args, kwargs = tree_map(_widen, (args, kwargs))
        return func(*args, **kwargs)


class _Float64(TorchDispatchMode):
    """Operations inside PyTorch's composites and tensors made there."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _EXACT or func.is_view:  # (a view or a slice of a weight: only its elements are widened)
            return tree_map(_widen, func(*args, **kwargs))
        schema = func._schema
        mutated = bool(schema.arguments) and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write
        if mutated:  # an in-place op writes into its first operand: that one must stay the caller's tensor
            first, rest = args[0], tree_map(_widen, (args[1:], kwargs))
            return func(first, *rest[0], **rest[1])
        args, kwargs = tree_map(_widen, (args, kwargs))
        return func(*args, **kwargs)


def _concat(parts: list):
    """One output from the outputs of each row: tensors joined along the batch, tuples and Hugging Face's
    ModelOutput (a dict) field by field."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return type(first)(**{k: _concat([p[k] for p in parts]) for k in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(column)) for column in zip(*parts))
    return first


@contextlib.contextmanager
def rows_apart(module: torch.nn.Module, argument: str = "pixel_values"):
    """Within the block, `module` (whose rows are independent: a vision encoder) computes a batch one row of
    `argument` at a time, so its float64 activations are one image's. ViT-g's float64 MLP and attention over the
    gate's 4 images held 0.17 GiB at once, the peak of the Flan-T5-XL-width fp32 build. The float64 results equal
    the batch's up to float64 rounding (1e-16 relative, under float32's by 9 orders)."""
    had, forward = "forward" in module.__dict__, module.forward

    def one_row_at_a_time(*args, **kwargs):
        batch = kwargs[argument] if argument in kwargs else args[0]
        if batch.shape[0] <= 1:
            return forward(*args, **kwargs)
        rows = []
        for i in range(batch.shape[0]):
            if argument in kwargs:
                rows.append(forward(*args, **{**kwargs, argument: batch[i:i + 1]}))
            else:
                rows.append(forward(batch[i:i + 1], *args[1:], **kwargs))
        return _concat(rows)

    module.forward = one_row_at_a_time
    try:
        yield
    finally:
        if had:
            module.forward = forward
        else:
            del module.forward


@contextlib.contextmanager
def float64():
    """Run PyTorch in float64 inside the block: float32 operands widened per operation, tensors created without a
    type or as float32 made float64. Outputs are float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad(), _Float64Functions(), _Float64():
            yield
    finally:
        torch.set_default_dtype(default)
