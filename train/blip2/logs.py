"""Keep the terminal for what the toolkit says: show its own log lines (runtime.logs.show) and silence what its use
of PyTorch and transformers makes them print (weight-loading progress bars, deprecation warnings about calls the
toolkit makes, the ONNX exporter's "torchvision is not installed" notes). Errors still show.

    from train.blip2.logs import quiet_libraries
    quiet_libraries()      # at the start of a command-line tool or benchmark
"""
import contextlib
import logging
import os
import warnings

from runtime.logs import show


def quiet_libraries(level: int = logging.INFO) -> None:
    """The toolkit's records at `level` on stdout, third-party ones only from errors up."""
    show(level=level)
    for noisy in ("torch.onnx", "torch._export", "torch.export", "transformers", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
