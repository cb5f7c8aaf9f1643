"""What each Ray actor that runs a `Blip2Pipeline` (a `runtime batch` worker, a `runtime serve` replica) asks Ray
for, and the check that the cluster has it.

An actor running a TensorRT engine folder asks for a GPU (or a share of one: 0.5 puts two actors on one GPU).
Ray then places it on a node with a free GPU and shows it that GPU alone (CUDA_VISIBLE_DEVICES), so actors spread
over a node's GPUs instead of all opening device 0, and never land on a CPU-only node. ONNX Runtime's folders
run on the CPU and ask for none. Ray waits, without a word, for resources a cluster does not have: on a machine
whose GPUs Ray does not see, the command would hang, so it checks first. (A Jetson's integrated GPU is one Ray
does not detect: there, `--gpus 0` runs the actors without asking Ray, all on that GPU. Ray 2.60 leaves
CUDA_VISIBLE_DEVICES alone for actors that ask for no GPU; older Ray emptied it.)
"""
import os

from runtime.errors import Blip2EdgeError
from runtime.ort_runner import PROVIDER_DEVICES, provider_name


class ActorResourceError(Blip2EdgeError, ValueError):
    """The actors cannot get the GPUs they ask for (a bad --gpus, or fewer GPUs in the cluster)."""


def gpus_per_actor(manifest, gpus: float | None = None, providers: list | None = None) -> float:
    """The GPUs each actor asks for: `gpus` where given, else 1 for a TensorRT engine folder or an ONNX folder
    run on a GPU provider first (`providers`: CUDA's or TensorRT's), 0 for ONNX Runtime on the CPU."""
    if gpus is None:
        on_gpu = bool(providers) and provider_name(providers[0]) in PROVIDER_DEVICES
        return 1.0 if manifest.is_tensorrt or on_gpu else 0.0
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0:
        raise ActorResourceError(f"--gpus {gpus!r}: give the GPUs each worker uses, 0 or more (0.5: two share one)")
    return float(gpus)


def check_cluster_gpus(per_actor: float, actors: int, what: str, address: str | None = None) -> None:
    """After ray.init: the cluster has the GPUs that `actors` actors of `per_actor` GPUs each ask for (Ray would
    otherwise wait for them for ever). `what`: an actor as the user names it ("worker", "replica"). Not checked
    on a cluster named by `address` or RAY_ADDRESS (other than "local"), which may add GPU nodes on demand."""
    address = address or os.environ.get("RAY_ADDRESS")
    if per_actor <= 0 or (address and address != "local"):
        return
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    need = per_actor * actors
    if have < need:
        raise ActorResourceError(
            f"{actors} {what}{'s' * (actors != 1)} ask{'s' * (actors == 1)} for {need:g} GPU{'s' * (need != 1)} "
            f"({per_actor:g} each) but Ray sees {have:g} on this machine; use fewer {what}s or a share of a GPU each "
            f"(--gpus 0.5), run on a machine with GPUs (with a TensorRT engine folder built on it), or an ONNX "
            f"Runtime folder on the CPU; where the GPU is one Ray does not detect (a Jetson's), --gpus 0 runs the "
            f"{what}s on it without asking Ray")
