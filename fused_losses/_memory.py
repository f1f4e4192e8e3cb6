"""This process's resident memory on Linux: the CPU side of every peak-memory measurement
(trainer reports, planner validation, benchmarks)."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (writing 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False
