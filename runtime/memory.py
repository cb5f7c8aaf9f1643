"""Handing freed memory back to the system (glibc), for processes that hold large buffers one after another: a build
reading weights, a service replica reading request bodies and decoding images.

    from runtime.memory import map_large_allocations, return_freed_memory, trim
    map_large_allocations()   # once, in a process the caller owns: large blocks are memory maps, freed at once
    trim()                    # after a large step: the heap's freed pages go back too
    return_freed_memory()     # the same after collecting garbage (a build's steps; see `collecting`)

Without them, the heap's freed holes still count as the process's memory, and the next step stacks its peak on
them. Both are no-ops where the C library is not glibc.
"""
import contextlib
import ctypes
import ctypes.util


def libc_call(function: str, *args) -> None:
    """Call glibc's `function` (malloc_trim, mallopt); a no-op where the C library lacks it."""
    try:
        getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold: int = 4 * 2**20) -> None:
    """For the rest of the process, serve every allocation above `threshold` bytes from a memory map of its own,
    handed back to the system when freed. glibc otherwise raises this threshold as large blocks are freed (up to
    32 MiB), after which large buffers (a 2560 x 2560 float32 matrix is 25 MiB, a request body up to 20 MB) come
    from the heap, whose freed holes still count as the process's memory (the full-width onnx-fp16 build's peak,
    docs/export.md "Full size"). Process-wide, so only a command or an actor that owns its process calls it."""
    libc_call("mallopt", -3, threshold)  # -3: M_MMAP_THRESHOLD


def trim() -> None:
    """Hand the heap's freed pages back to the system."""
    libc_call("malloc_trim", 0)


# A full garbage collection between a build's steps is worth it only for large models: in a process holding many
# objects one gc.collect() takes most of a second (23 calls were 60% of a tiny model's onnx-fp16 build in the test
# suite) and frees a few megabytes. Builds of checkpoints whose float32 weights are below this skip it.
COLLECT_ABOVE_BYTES = 256 * 2**20
_collecting = [True]


@contextlib.contextmanager
def collecting(enabled: bool):
    """Within the block, return_freed_memory runs the garbage collector only when `enabled`."""
    before, _collecting[0] = _collecting[0], enabled
    try:
        yield
    finally:
        _collecting[0] = before


def return_freed_memory() -> None:
    """Collect garbage (see `collecting`) and hand the heap's freed pages back to the system (glibc keeps them
    otherwise, and they count as the process's memory: a build's next step would stack its peak on them); trim is a
    no-op elsewhere."""
    import gc

    if _collecting[0]:
        gc.collect()
    trim()
