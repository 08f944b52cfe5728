"""A server test's child process, stopped the way a user stops it (SIGTERM, then a kill)."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM ``proc`` if it still runs and return its exit code; killed if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
