"""Handing freed memory back to the system (glibc), for processes that hold large buffers one after another: a build
reading weights, a service replica reading request bodies and decoding images.

    from runtime.memory import map_large_allocations, trim
    map_large_allocations()   # once, in a process the caller owns: large blocks are memory maps, freed at once
    trim()                    # after a large step: the heap's freed pages go back too

Without them, the heap's freed holes still count as the process's memory, and the next step stacks its peak on
them. Both are no-ops where the C library is not glibc.
"""
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
    README "Full size"). Process-wide, so only a command or an actor that owns its process calls it."""
    libc_call("mallopt", -3, threshold)  # -3: M_MMAP_THRESHOLD


def trim() -> None:
    """Hand the heap's freed pages back to the system."""
    libc_call("malloc_trim", 0)
