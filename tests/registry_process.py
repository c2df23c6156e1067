"""A `qlora-serve serve --role registry` process for tests (the CLI as operators run it):
a fixed free loopback port, so it can be killed and started again there."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from server_process import start_serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryProcess:
    """`qlora-serve serve --role registry` on a fixed port (restartable there)."""

    def __init__(self, base: Path, data_dir: Path, key_file: Path, log: Path, allowed_root: Path | None = None) -> None:
        self.args = ["--role", "registry", "--base", str(base),
                     "--port", str(_free_port()), "--no-metrics", "--no-http", "--data-dir", str(data_dir),
                     "--key-file", str(key_file), "--compute-dtype", "float32", "--grace", "0"]
        if allowed_root is not None:  # RegisterAdapter may read server-side paths there
            self.args += ["--allowed-adapter-root", str(allowed_root)]
        self.address = f"127.0.0.1:{self.args[self.args.index('--port') + 1]}"
        self.log = log
        self.proc = None

    def start(self) -> "RegistryProcess":
        self.proc, _ = start_serve(self.args, self.log, what="registry")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
