"""Start `python -m qlora_serve.server.cli serve ...` (the CLI as operators run it) and
wait for its "ready on" line: the one start-up path of the tests' server processes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def start_serve(args: list[str], log: Path, *, timeout_s: float = 120, omp_threads: int | None = 1,
                what: str = "server") -> tuple[subprocess.Popen, str]:
    """Run `qlora-serve serve *args` (stderr appended to `log`) until it prints "ready on";
    returns (process, "127.0.0.1:PORT" read from that line). Kills it and fails the test
    if it is not ready within `timeout_s` seconds. omp_threads: OMP_NUM_THREADS for it
    (None: inherited, e.g. to let the server size a training job's threads itself)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    proc = subprocess.Popen([sys.executable, "-m", "qlora_serve.server.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            raise AssertionError(f"{what} did not start in {timeout_s:.0f} s; see {log}") from None
        if "ready on" in line:
            return proc, "127.0.0.1:" + line.split("ready on ", 1)[1].split()[0].rsplit(":", 1)[1]
