"""export.float64 computes PyTorch modules in float64 without widening their weights beforehand: what the fp32
gate's bound is measured against."""
import pytest
import torch
import torch.nn.functional as F

from export.float64 import float64


class Casts(torch.nn.Module):
    """What Hugging Face's models do: explicit float32 casts (T5's RMS norm), softmax in float32 (OPT), a
    convolution (the ViT's patches), an embedding, LayerNorm, GELU, an in-place update of a fresh tensor."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.embed = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, pixels, ids):
        x = self.conv(pixels).flatten(2).transpose(1, 2) + self.embed(ids)
        x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)
        x = F.gelu(self.fc(self.norm(x)))
        scores = F.softmax(x @ x.transpose(1, 2), dim=-1, dtype=torch.float32)
        out = torch.zeros_like(x)
        out += scores @ x.float()
        return out


def _exact(model, pixels, ids):
    """The same maths written out in float64 from float64 copies of the weights."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    x = F.conv2d(pixels.double(), w["conv.weight"], w["conv.bias"], stride=4).flatten(2).transpose(1, 2)
    x = x + w["embed.weight"][ids]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = F.gelu(F.linear(F.layer_norm(x, (16,), w["norm.weight"], w["norm.bias"]), w["fc.weight"], w["fc.bias"]))
    return F.softmax(x @ x.transpose(1, 2), dim=-1) @ x


def test_float64_is_the_float64_computation():
    torch.manual_seed(0)
    model = Casts().eval()
    with torch.no_grad():
        model.fc.weight.mul_(30)  # large activations: float32's rounding shows
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 16))
    exact = _exact(model, pixels, ids)
    with torch.no_grad():
        fp32 = model(pixels, ids)
    with float64():
        wide = model(pixels, ids)
    assert wide.dtype == torch.float64 and all(p.dtype == torch.float32 for p in model.parameters())
    fp32_err, wide_err = (fp32.double() - exact).abs().max(), (wide - exact).abs().max()
    # float32 is off by about its last bit (~1e-7 of the range), the float64 mode by float64's: an operation left in
    # float32 (a cast or a softmax dtype kept) would put it at float32's
    assert wide_err < 1e-12 * exact.abs().max() and fp32_err > 1e4 * wide_err
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("variant,prompted", [("tiny", False), ("t5", True)])
def test_teacher_forced_logits_are_those_generate_chose_from(make_engine, variant, prompted):
    """The gate's float64 reference is one forward pass over Hugging Face's generated tokens (HfReference.
    teacher_forced, fed the ids generate() laid out itself); in float32 it gives generate's own step logits, within
    float32 rounding, for captions and prompts, OPT and T5."""
    from export.parity import GATE_PROMPTS, probe_images
    from train.blip2.checkpoint import load_checkpoint
    from train.blip2.reference import HfReference

    ck = load_checkpoint(make_engine(variant)[0])
    ref = HfReference(ck)
    images = probe_images(ck.config.vision_config.image_size, count=3, seed=2)
    generated = ref.generate(images, GATE_PROMPTS[:3] if prompted else None, max_new_tokens=8, output_logits=True)
    forced = ref.teacher_forced(images, generated)
    for step_logits, one_pass in zip(generated.logits, forced):
        assert one_pass.shape == step_logits.shape
        assert (one_pass - step_logits).abs().max() <= 1e-5 * step_logits.abs().max()


def test_a_large_weight_is_widened_in_blocks_of_rows(monkeypatch):
    """An LM-head-sized weight is widened a block of rows at a time (its float64 copy whole would add twice its
    float32 size to the build's peak); the result is the float64 product, with and without a bias."""
    import export.float64 as f64

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    monkeypatch.setattr(f64, "CHUNK_BYTES", 8 * 64 * 100)  # 100 rows a block: 30 blocks
    for bias in (True, False):
        layer = torch.nn.Linear(64, 3000, bias=bias)
        with f64.float64():
            got = layer(x)
        want = torch.nn.functional.linear(x.double(), layer.weight.double(),
                                          layer.bias.double() if bias else None)
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert (got - want).abs().max() < 1e-13  # (float64's own rounding; float32's would be ~1e-6)


def test_reading_a_weights_metadata_widens_nothing(monkeypatch):
    """Hugging Face's `model.device` reads the first parameter at every generate step: reading it (its device,
    shape, dtype, size) must not widen the weight (a 1.6 GB float64 copy of OPT-6.7B's embedding table, twice per
    step, was half the end-to-end reference's peak). A float32 dtype still reads float64 inside the block."""
    import export.float64 as f64

    widened = []
    real = f64._widen
    monkeypatch.setattr(f64, "_widen", lambda v: widened.append(v) or real(v) if isinstance(v, torch.Tensor)
                        and v.dtype == torch.float32 and v.numel() >= 1000 else real(v))
    model = torch.nn.Embedding(100, 64)
    with f64.float64():
        param = next(model.parameters())
        facts = (param.device, param.shape, param.numel(), param.dim(), param.size(0), param.is_floating_point(),
                 param.dtype)
    assert not widened, f"{len(widened)} weight(s) widened to read metadata"
    assert facts[:6] == (torch.device("cpu"), (100, 64), 6400, 2, 100, True) and facts[6] == torch.float64
    with f64.float64():
        model.weight * 2  # (arithmetic does widen it: the spy sees that)
    assert widened


def test_a_vision_encoder_takes_a_batch_one_image_at_a_time():
    """rows_apart: inside float64, Hugging Face's BLIP-2 vision encoder computes a batch one image at a time (its
    float64 activations for 4 images at ViT-g's width were a full-width build's peak); every output field equals
    the batch's within float64 rounding (a row mixed up or a field dropped would differ by the activations' size),
    the model is called as Hugging Face calls it (keywords), and after the block the module is as it was."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from export.float64 import rows_apart

    torch.manual_seed(0)
    model = Blip2VisionModel(Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=28, patch_size=14)).eval()
    pixels = torch.randn(3, 3, 28, 28)
    rows = []  # batch sizes the patch embedding sees
    model.embeddings.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    with float64():
        whole = model(pixel_values=pixels, output_hidden_states=True)
        with rows_apart(model):
            apart = model(pixel_values=pixels, output_hidden_states=True)
    assert rows == [3, 1, 1, 1] and "forward" not in model.__dict__
    for field in ("last_hidden_state", "pooler_output"):
        assert apart[field].shape == whole[field].shape and apart[field].dtype == torch.float64
        assert (apart[field] - whole[field]).abs().max() < 1e-12
    assert len(apart.hidden_states) == len(whole.hidden_states)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(apart.hidden_states, whole.hidden_states))
