"""What the build's command line does before its slow imports (`python -m export.build`, `python -m export`,
`blip2-export`): Ctrl-C or SIGTERM (a CI runner, `timeout`, systemd) at any moment, the slow imports included,
gives one line and exit 130 or 143, no traceback; a runtime-only install gets one line naming the extra. So this
module imports nothing heavy, and `prepare` runs before export.build's imports.
"""
import signal
import sys


def prepare() -> None:
    def _interrupted(number, _frame):
        print("interrupted: no engine folder was written", file=sys.stderr)
        raise SystemExit(128 + number)  # unwinds like an exception: _staging removes the partial folder on its way

    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    import importlib.util

    _missing = [m for m in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
                if importlib.util.find_spec(m) is None]
    if _missing:  # (a runtime-only install: one line naming the extra, not an ImportError's traceback)
        print(f"error: `python -m export.build` needs {', '.join(_missing)}; install the export extra: "
              f"pip install \".[export]\"", file=sys.stderr)
        raise SystemExit(2)
