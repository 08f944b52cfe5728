"""Start N local JAX processes running one command: ``python -m stimage_jax.launch -n 2 -- stimage train ...``.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``, which ``stimage train`` reads (:mod:`stimage_jax.distributed`);
``--devices-per-process K`` forces K CPU devices in each (``--xla_force_host_platform_device_count``),
so a laptop or CI exercises the multi-host code paths. A leading ``stimage`` runs this
interpreter's CLI. When one process fails (or the launcher gets SIGTERM or Ctrl-C) the others are killed; the exit code is the first
non-zero one. Process 0's output passes through; the others' output is prefixed with
``[process I]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from stimage_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["main", "process_env", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, coordinator: str, devices_per_process: int | None, base=os.environ) -> dict:
    env = dict(base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i)})
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _pipe(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stimage_jax.launch",
                                description="run one command as N local JAX processes (multi-host training on one machine)")
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="force this many CPU devices per process (testing multi-host code on CPU)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. stimage train ...")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd or a.num_processes < 1:
        p.error("give -n N >= 1 and a command after --")
    if cmd[0] == "stimage":
        cmd = [sys.executable, "-c", "import sys; from stimage_jax.cli import main; sys.exit(main())", *cmd[1:]]
    coordinator = f"127.0.0.1:{a.port or free_port()}"
    # SIGTERM to the launcher stops every process it started (the finally below), not only itself.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    procs, threads = [], []
    for i in range(a.num_processes):
        proc = subprocess.Popen(cmd, env=process_env(i, a.num_processes, coordinator, a.devices_per_process),
                                stdout=None if i == 0 else subprocess.PIPE,
                                stderr=None if i == 0 else subprocess.STDOUT, text=True)
        procs.append(proc)
        if i:
            t = threading.Thread(target=_pipe, args=(proc.stdout, f"[process {i}] ", sys.stderr), daemon=True)
            t.start()
            threads.append(t)
    rc = 0
    try:
        while any(q.poll() is None for q in procs):
            failed = [q.returncode for q in procs if q.returncode not in (None, 0)]
            if failed:
                rc = failed[0]
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        rc = 130
    finally:
        # A failed (or interrupted) process leaves the others waiting in collectives, and JAX's
        # distributed client takes SIGTERM as a preemption notice and carries on: SIGKILL. A
        # checkpoint being written is left as Orbax's temporary folder, which a resume ignores.
        for q in procs:
            if q.poll() is None:
                q.kill()
        for q in procs:
            q.wait()
        for t in threads:
            t.join(timeout=1)
    return rc or next((q.returncode for q in procs if q.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
