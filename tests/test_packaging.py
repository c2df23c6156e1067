"""The wheel installs ONE top-level import package, `qlora_serve`, with the repo's
root folders as its sub-packages, plus the `qlora-serve` console script."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("qlora_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"qlora_serve"}, top
    for module in ("qlora_serve/server/app.py", "qlora_serve/server/engine/engine.py",
                   "qlora_serve/adapters/registry.py", "qlora_serve/training/trainer.py",
                   "qlora_serve/v1/inference_pb2.py", "qlora_serve/v1/inference.proto"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qlora-serve = qlora_serve.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_cli_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for verb in ("serve", "generate", "adapters", "train", "merge", "keys", "health"):
        assert verb in out


def test_serve_help_states_each_default_once():
    import re

    out = subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    flags = re.split(r"\n  (?=--)", out)
    assert len(flags) > 20
    for text in flags:
        assert len(re.findall(r"\(default:", text)) <= 1, text
    assert re.search(r"--max-running MAX_RUNNING\s+rows decoded.*\(default: 16\)\n", out)
    host = next(t for t in flags if t.startswith("--host-cache-bytes"))
    assert "host RAM" in host and "0 = no host cache" in host and "(default: 1073741824)" in host


def test_register_label_without_equals_is_a_usage_error():
    from qlora_serve.server.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["adapters", "register", "a", "dir", "--label", "k=v=w", "--label", "e="])
    assert args.label == [("k", "v=w"), ("e", "")]
    run = subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", "adapters", "register", "a", "dir",
                          "--label", "foo", "--address", "127.0.0.1:1"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "--label needs KEY=VALUE, got 'foo'" in run.stderr and "Traceback" not in run.stderr
