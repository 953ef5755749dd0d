"""A process's resident memory on Linux, read from /proc (no torch: the CPU benchmarks' workers
import this before they set torch's thread count)."""

from __future__ import annotations

import ctypes
import re


def status_kb(*keys: str) -> tuple:
    """Values (kB) of /proc/self/status fields, read at one instant; None where missing."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return (None,) * len(keys)
    out = []
    for key in keys:
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out.append(int(m.group(1)) if m else None)
    return tuple(out)


def malloc_trim() -> None:
    """Hand freed heap back to the OS, so that the next high-water mark starts from live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset the RSS high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_kb("VmHWM", "VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def must_reset_hwm() -> None:
    """reset_hwm(), or stop: a peak read without the reset would include the set-up's."""
    if not reset_hwm():
        raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs, Linux "
                         "≥ 4.0): the peak would include the set-up's memory")
