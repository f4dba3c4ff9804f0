"""Process memory measurement for tests and benchmarks: peak RSS since a baseline, on Linux.

Linux keeps a high-water mark of resident memory (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs`` resets it
to the current RSS. So ``reset_peak_rss()`` after setup and warm-up, then ``peak_rss() - baseline`` after the work,
is the extra memory the work needed at its peak, whatever freed it afterwards.

Run measured code with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment: glibc then serves every large
allocation with its own mapping and returns it on free, so memory freed during warm-up is not silently reused
(which would hide a peak) and freed buffers do not linger in the heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_supported() -> bool:
    """Whether this process can reset and read its peak RSS (Linux with a writable clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory since the last reset (or process start), in bytes."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> int:
    """Collect garbage, return free heap to the OS, reset the peak to now; returns that baseline in bytes."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline is just less tight
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return peak_rss()


def run_measured(
    command: list[str], *, env: dict[str, str] | None = None, cwd=None, timeout: float | None = None
) -> dict:
    """Run ``command`` in a fresh process with the allocator setting above; parse its last stdout line as JSON.

    Raises RuntimeError with the end of its stderr when it fails, ``subprocess.TimeoutExpired`` after ``timeout``
    seconds.
    """
    full_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **(env or {}))
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
