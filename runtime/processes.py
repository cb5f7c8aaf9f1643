"""Whether a process still runs: what decides that a lock or a leftover folder named after a PID is stale."""
import os


def alive(pid: int) -> bool:
    """True while process `pid` exists (also another user's, which we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
