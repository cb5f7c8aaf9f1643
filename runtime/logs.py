"""What the toolkit says on the terminal. Every module logs to its own logger (`logging.getLogger(__name__)`: a
build's steps, a training run's losses, a batch job's progress); the command-line tools call `show` so those lines
reach the terminal as they are, and a program that imports the toolkit configures logging as it likes (nothing is
printed unless it does).

    from runtime.logs import show
    show()                       # INFO lines of runtime.*, export.*, train.* on stdout; others' warnings on stderr
    show(sys.stderr)             # (where stdout holds the results, as in `python -m runtime batch`)
"""
import logging
import sys

OURS = ("runtime", "export", "train")


class _Ours(logging.Filter):
    def __init__(self, ours: bool):
        super().__init__()
        self.ours = ours

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name.split(".")[0] in OURS) == self.ours


def show(stream=None, level: int = logging.INFO) -> None:
    """The toolkit's records at `level` and above as plain lines on `stream` (default stdout); other libraries'
    warnings and errors as "WARNING: ..." on stderr. Calling it again replaces what it set up before."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_blip2_edge", False)]:
        root.removeHandler(handler)
    ours = logging.StreamHandler(stream or sys.stdout)
    ours.setFormatter(logging.Formatter("%(message)s"))
    ours.addFilter(_Ours(True))
    others = logging.StreamHandler(sys.stderr)
    others.setLevel(logging.WARNING)
    others.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    others.addFilter(_Ours(False))
    for handler in (ours, others):
        handler._blip2_edge = True
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(level)
