"""The parity gate: ONNX/TensorRT outputs against PyTorch, with explicit tolerances per precision.

Every comparison goes through `compare()`, whatever the backend, and every
failure is collected before `ParityError` is raised, so one report shows all
that is wrong:

    from export.parity import TOLERANCES, check_graph, raise_on_failure
    results = check_graph(spec, wrapper, runner, TOLERANCES["fp32"])
    raise_on_failure(results)          # ParityError listing every failing output

A check passes when the output is finite and meets every bound its precision sets:
  * element-wise |got - ref| <= atol + rtol * |ref| (numpy's allclose rule; fp32),
  * max_rel = max|got - ref| / max|ref| <= max_rel (error relative to the output's range; fp16, int8),
  * cosine(got, ref) >= min_cosine over the flattened output (direction; fp16, int8).
Reduced-precision graphs are checked on feeds recorded from the real pipeline (`export.calibration`),
since an INT8 graph is only right for inputs like its calibration data.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from export.specs import GraphSpec, torch_inputs


@dataclass(frozen=True)
class Tolerance:
    atol: float | None  # element-wise bound (None: not checked)
    rtol: float | None
    why: str
    max_rel: float | None = None  # bound on max|got - ref| / max|ref|
    min_cosine: float | None = None  # bound on the cosine similarity of the flattened outputs


# fp32: ONNX Runtime and PyTorch run the same maths in a different order (fused kernels, other
# reduction orders); over a few layers that moves values by ~1e-6 relative, so 1e-4 absolute
# plus 1e-3 relative catches any real error (a wrong mask or weight moves values by >1e-2)
# while never failing on summation order. Token ids must match exactly at fp32.
#
# fp16: float16 carries 11 significant bits (rounding error 4.9e-4 relative per operation); through a few
# dozen operations the error stays around 1e-3 of an output's range (measured: 3e-4..1.3e-3 on the tiny
# and demo presets, random and trained, and on the small preset), so 1e-2 of the range leaves a 7x margin
# and still catches a wrong weight, mask or overflow (errors of the order of the range itself); the
# direction of every output must be all but exact (cosine >= 0.9995; measured >= 0.99999).
# int8: symmetric per-tensor activations and per-channel weights carry 8 bits (error up to 1/254 of the
# range per quantised product); over the layers of a graph that adds up to a few percent of the range
# (measured on held-out images of the calibration's kind: 0.013..0.042 on the trained demo model, up to
# 0.062 on the random small preset; cosine >= 0.9987), so 10% of the range and cosine >= 0.99 bound it,
# while ranges clipped by calibration on other data fail (the same demo model checked on noise images:
# 0.13 and 0.49 of the range, caught; see tests/test_precision.py for a clipped calibration).
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, why="same maths, different summation order"),
    "fp16": Tolerance(atol=None, rtol=None, max_rel=1e-2, min_cosine=0.9995,
                      why="float16 weights and compute; LayerNorm, softmax and attention scores in float32"),
    "int8": Tolerance(atol=None, rtol=None, max_rel=0.1, min_cosine=0.99,
                      why="int8 weights (per channel) and activations (per tensor), calibrated ranges"),
}


@dataclass
class Comparison:
    graph: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    cosine: float
    bounds: str
    passed: bool
    detail: str = ""

    def __str__(self):
        verdict = "ok  " if self.passed else "FAIL"
        return (f"{verdict} {self.graph}/{self.output} [{self.case}] max_abs={self.max_abs:.3g} "
                f"max_rel={self.max_rel:.3g} cosine={self.cosine:.6f} ({self.bounds}){self.detail}")


class ParityError(AssertionError):
    """Raised with every failing comparison; `.failures` holds them."""

    def __init__(self, failures: list[Comparison]):
        self.failures = failures
        lines = "\n  ".join(str(f) for f in failures)
        super().__init__(
            f"{len(failures)} parity check(s) failed against PyTorch:\n  {lines}\n"
            f"The exported graph does not compute what the PyTorch model computes; no engine folder was written."
        )


def bounds(tol: Tolerance) -> str:
    parts = []
    if tol.atol is not None:
        parts.append(f"atol={tol.atol:g}, rtol={tol.rtol:g}")
    if tol.max_rel is not None:
        parts.append(f"max_rel<={tol.max_rel:g}")
    if tol.min_cosine is not None:
        parts.append(f"cosine>={tol.min_cosine:g}")
    return ", ".join(parts)


def compare(graph: str, case: str, name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Comparison:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Comparison(graph, case, name, float("inf"), float("inf"), 0.0, bounds(tol), False,
                          f" shape {got.shape} != reference {ref.shape}")
    if got.size == 0:
        return Comparison(graph, case, name, 0.0, 0.0, 1.0, bounds(tol), True)
    finite = bool(np.isfinite(got).all())
    if not finite:
        return Comparison(graph, case, name, float("inf"), float("inf"), 0.0, bounds(tol), False,
                          " non-finite values in the output")
    diff = np.abs(got - ref)
    max_abs = float(diff.max())
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    norms = float(np.linalg.norm(got) * np.linalg.norm(ref))
    cosine = float((got * ref).sum() / norms) if norms > 0 else float(np.array_equal(got, ref))
    passed = True
    if tol.atol is not None:
        passed &= bool((diff <= tol.atol + tol.rtol * np.abs(ref)).all())
    if tol.max_rel is not None:
        passed &= max_rel <= tol.max_rel
    if tol.min_cosine is not None:
        passed &= cosine >= tol.min_cosine
    return Comparison(graph, case, name, max_abs, max_rel, cosine, bounds(tol), passed)


def case_name(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def recorded_case(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> str:
    """'recorded:batch=3,text=1,past=12': the named axis sizes of a recorded call."""
    sizes = {}
    for t in spec.inputs:
        for axis, n in zip(t.shape, feeds[t.name].shape):
            if isinstance(axis, str) and "+" not in axis:
                sizes.setdefault(axis, n)
    return "recorded:" + case_name(sizes)


def check_graph(spec: GraphSpec, wrapper: torch.nn.Module, runner, tol: Tolerance, seed: int = 1,
                feeds: list[dict] | None = None) -> list[Comparison]:
    """Run `runner` and the PyTorch `wrapper` and compare every output: on random inputs at the spec's check
    sizes (not the export sizes), or on `feeds` (recorded calls of the real pipeline) when given."""
    results = []
    rng = np.random.default_rng(seed)
    cases = ([(recorded_case(spec, f), f) for f in feeds] if feeds is not None else
             [(case_name(sizes), spec.make_inputs(sizes, rng)) for sizes in spec.check_sizes])
    for case, inputs in cases:
        with torch.no_grad():
            ref = wrapper(*torch_inputs(spec, inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = runner.run(inputs)
        for out, r in zip(spec.outputs, ref):
            results.append(compare(spec.name, case, out.name, got[out.name], r.numpy(), tol))
    return results


def raise_on_failure(results: list[Comparison]) -> None:
    failures = [r for r in results if not r.passed]
    if failures:
        raise ParityError(failures)


def summarize(results: list[Comparison]) -> dict:
    """Per graph: worst max_abs / max_rel over all cases and outputs, and whether all passed."""
    out = {}
    for r in results:
        g = out.setdefault(r.graph, {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0, "passed": True, "checks": 0})
        g["max_abs"] = max(g["max_abs"], r.max_abs)
        g["max_rel"] = max(g["max_rel"], r.max_rel)
        g["min_cosine"] = min(g["min_cosine"], r.cosine)
        g["passed"] &= r.passed
        g["checks"] += 1
    return out


def as_records(results: list[Comparison]) -> list[dict]:
    return [asdict(r) for r in results]
