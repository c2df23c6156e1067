"""A `qlora-serve serve --role registry` process for tests (the CLI as operators run it):
a fixed free loopback port, so it can be killed and started again there."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryProcess:
    """`qlora-serve serve --role registry` on a fixed port (restartable there)."""

    def __init__(self, base: Path, data_dir: Path, key_file: Path, log: Path, allowed_root: Path | None = None) -> None:
        self.args = [sys.executable, "-m", "qlora_serve.server.cli", "serve", "--role", "registry", "--base", str(base),
                     "--port", str(_free_port()), "--no-metrics", "--no-http", "--data-dir", str(data_dir),
                     "--key-file", str(key_file), "--compute-dtype", "float32", "--grace", "0"]
        if allowed_root is not None:  # RegisterAdapter may read server-side paths there
            self.args += ["--allowed-adapter-root", str(allowed_root)]
        self.address = f"127.0.0.1:{self.args[self.args.index('--port') + 1]}"
        self.log = log
        self.proc = None

    def start(self) -> "RegistryProcess":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"registry did not start in 120 s; see {self.log}") from None
            if "ready on" in line:
                return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
