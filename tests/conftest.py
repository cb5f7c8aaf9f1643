"""Shared fixtures: tiny checkpoints built from presets and engine folders exported from them (built once per
session)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Configurations unlike the default: the exporter must not depend on the numbers we usually test with.
VARIANTS = {
    "tiny": {},
    "nobos": {"tokenizer_adds_bos": False},  # the tokenizer adds no BOS: a caption still starts with the model's
    "postln": {"do_layer_norm_before": False},  # OPT-350m style post-layernorm, no final layer norm
    "untied": {"tie_word_embeddings": False, "num_query_tokens": 3},
    "geometry": {"image_size": 48, "patch_size": 12, "num_query_tokens": 6, "llm_layers": 3, "llm_heads": 2},
    # encoder-decoder LLMs: Flan-T5's layout (gated-GELU FFN, untied head, d_kv != width / heads), and the original
    # T5's (ReLU FFN, tied embeddings, LM head input scaled by d_model ** -0.5)
    "t5": {"preset": "tiny-t5", "qformer_text": True},  # with the Q-Former's text side: every T5 graph
    "t5-orig": {"preset": "tiny-t5", "t5_ffn": "relu", "tie_word_embeddings": True, "num_query_tokens": 3},
    # what trained models have and random ones lack (train.blip2.random_checkpoint.trained_like): weights at
    # 3/sqrt(fan_in) and the LLM's embeddings x2, T5's large activations and sharp softmaxes, in both T5 layouts; OPT's
    # outlier features (3 hidden dimensions of the LayerNorm outputs every product reads x20..x60, the weights trained
    # around them)
    "t5-trained": {"preset": "tiny-t5", "scales": "trained"},
    "t5-orig-trained": {"preset": "tiny-t5", "t5_ffn": "relu", "tie_word_embeddings": True, "num_query_tokens": 3,
                        "scales": "trained"},
    "opt-outliers": {"outliers": 3},
}
# The variants with real activations: their builds pass the fp32 gate and their greedy tokens are generate()'s
# (tests/test_export_parity.py); beam search, the same code on every variant, runs on the others only.
ACTIVATION_VARIANTS = {"t5-trained", "t5-orig-trained", "opt-outliers"}
# Variants whose tests run only under `pytest -m slow` (the default suite keeps to its time budget): OPT-350m's
# post-layernorm layout is one switch inside OPT that Hugging Face's own modules compute for us.
SLOW_VARIANTS = {"postln"}


def variants(names):
    """pytest parameters for `names`, the slow variants marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_VARIANTS else n for n in names]


# Checkpoints with the Q-Former's text side: stage 1 (ITC/ITM/ITG, no LLM) and stage 2 keeping it.
QFORMER_VARIANTS = {
    "stage1": {"stage": 1},
    "stage1-geometry": {"stage": 1, "num_query_tokens": 5, "qformer_layers": 3, "cross_attention_frequency": 2,
                        "image_size": 48, "patch_size": 12},
    "stage2text": {"qformer_text": True},
}


@pytest.fixture(scope="session")
def make_engine(tmp_path_factory):
    """make_engine(variant, target="onnx") -> (checkpoint folder, engine folder), built once per variant and
    target per session (the targets of one variant share its checkpoint). Under pytest-xdist the workers share
    them: the first worker to ask builds, under a file lock, and the others wait and reuse (a build is the
    suite's most expensive step)."""
    import json

    from filelock import FileLock

    from export.build import build
    from train.blip2.random_checkpoint import make_random_checkpoint

    base = tmp_path_factory.getbasetemp()
    shared = base.parent / "shared-engines" if os.environ.get("PYTEST_XDIST_WORKER") else base / "engines"
    shared.mkdir(exist_ok=True)
    cache = {}

    def make(variant: str = "tiny", target: str = "onnx"):
        if (variant, target) in cache:
            return cache[variant, target]
        root = shared / f"engine-{variant}"
        with FileLock(str(shared / f"{variant}.lock")):
            built = root / "built.json"  # {target: engine folder}, written after each build
            done = json.loads(built.read_text()) if built.is_file() else {}
            ck = root / "checkpoints" / variant
            if not done:
                options = dict({**VARIANTS, **QFORMER_VARIANTS}[variant])
                preset = options.pop("preset", "tiny")
                ck = make_random_checkpoint(ck, preset, seed=0, **options)
            for step in dict.fromkeys(["onnx", target]):  # (a reduced build reuses the fp32 folder beside it)
                if step not in done:
                    done[step] = str(build(ck, step, root / "engines"))
                    built.write_text(json.dumps(done))
        for step in ("onnx", target):
            cache[variant, step] = (Path(ck), Path(done[step]))
        return cache[variant, target]

    return make


@pytest.fixture(scope="session")
def tiny_engine(make_engine):
    return make_engine("tiny")


@pytest.fixture(scope="session")
def pipeline(tiny_engine):
    from runtime import Blip2Pipeline

    return Blip2Pipeline.from_dir(tiny_engine[1])


@pytest.fixture(scope="session")
def checkpoint(tiny_engine):
    from train.blip2.checkpoint import load_checkpoint

    return load_checkpoint(tiny_engine[0])


# Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject's addopts) each test file runs on one worker, and the files
# whose tests listen on local ports (Ray and its services, two-process training) share one worker: a port picked
# free by one could otherwise be taken by the other worker's Ray before it is bound.
PORT_FILES = {"test_serve.py", "test_batch.py", "test_actors.py", "test_train.py", "test_user_training.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ports" if name in PORT_FILES else name))
