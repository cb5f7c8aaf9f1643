"""The parity gate: ONNX/TensorRT outputs against PyTorch, with explicit tolerances per precision.

Every comparison goes through `compare()`, whatever the backend, and every
failure is collected before `ParityError` is raised, so one report shows all
that is wrong:

    from export.parity import TOLERANCES, check_graph, raise_on_failure
    results = check_graph(spec, wrapper, runner, TOLERANCES["fp32"])
    raise_on_failure(results)          # ParityError listing every failing output

A check passes when every element satisfies |got - ref| <= atol + rtol * |ref|
(numpy's allclose rule). The reported relative error is max|got - ref| / max|ref|.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from export.specs import GraphSpec, torch_inputs


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    why: str


# fp32: ONNX Runtime and PyTorch run the same maths in a different order (fused kernels, other
# reduction orders); over a few layers that moves values by ~1e-6 relative, so 1e-4 absolute
# plus 1e-3 relative catches any real error (a wrong mask or weight moves values by >1e-2)
# while never failing on summation order. Token ids must match exactly at fp32.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, why="same maths, different summation order"),
}


@dataclass
class Comparison:
    graph: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    detail: str = ""

    def __str__(self):
        verdict = "ok  " if self.passed else "FAIL"
        return (f"{verdict} {self.graph}/{self.output} [{self.case}] max_abs={self.max_abs:.3g} "
                f"max_rel={self.max_rel:.3g} (atol={self.atol:g}, rtol={self.rtol:g}){self.detail}")


class ParityError(AssertionError):
    """Raised with every failing comparison; `.failures` holds them."""

    def __init__(self, failures: list[Comparison]):
        self.failures = failures
        lines = "\n  ".join(str(f) for f in failures)
        super().__init__(
            f"{len(failures)} parity check(s) failed against PyTorch:\n  {lines}\n"
            f"The exported graph does not compute what the PyTorch model computes; no engine folder was written."
        )


def compare(graph: str, case: str, name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Comparison:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Comparison(graph, case, name, float("inf"), float("inf"), tol.atol, tol.rtol, False,
                          f" shape {got.shape} != reference {ref.shape}")
    if got.size == 0:
        return Comparison(graph, case, name, 0.0, 0.0, tol.atol, tol.rtol, True)
    diff = np.abs(got - ref)
    finite = bool(np.isfinite(got).all())
    passed = finite and bool((diff <= tol.atol + tol.rtol * np.abs(ref)).all())
    max_abs = float(diff.max()) if finite else float("inf")
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    return Comparison(graph, case, name, max_abs, max_rel, tol.atol, tol.rtol, passed,
                      "" if finite else " non-finite values in the output")


def case_name(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def check_graph(spec: GraphSpec, wrapper: torch.nn.Module, runner, tol: Tolerance, seed: int = 1) -> list[Comparison]:
    """Run `runner` and the PyTorch `wrapper` on the spec's check sizes (not the export sizes) and compare."""
    results = []
    rng = np.random.default_rng(seed)
    for sizes in spec.check_sizes:
        feeds = spec.make_inputs(sizes, rng)
        with torch.no_grad():
            ref = wrapper(*torch_inputs(spec, feeds))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = runner.run(feeds)
        for out, r in zip(spec.outputs, ref):
            results.append(compare(spec.name, case_name(sizes), out.name, got[out.name], r.numpy(), tol))
    return results


def raise_on_failure(results: list[Comparison]) -> None:
    failures = [r for r in results if not r.passed]
    if failures:
        raise ParityError(failures)


def summarize(results: list[Comparison]) -> dict:
    """Per graph: worst max_abs / max_rel over all cases and outputs, and whether all passed."""
    out = {}
    for r in results:
        g = out.setdefault(r.graph, {"max_abs": 0.0, "max_rel": 0.0, "passed": True, "checks": 0})
        g["max_abs"] = max(g["max_abs"], r.max_abs)
        g["max_rel"] = max(g["max_rel"], r.max_rel)
        g["passed"] &= r.passed
        g["checks"] += 1
    return out


def as_records(results: list[Comparison]) -> list[dict]:
    return [asdict(r) for r in results]
