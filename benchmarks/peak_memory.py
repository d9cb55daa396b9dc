"""Peak resident memory of this process (Linux), shared by the benchmarks."""

from __future__ import annotations


def peak_rss() -> int:
    """Bytes of the process's peak resident set (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
