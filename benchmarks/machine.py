"""What every benchmark JSON records about where it ran, so figures are never quoted without their machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine_info(device=None) -> dict:
    """CPU model and cores, memory, library versions, GPU (if any), load average and git state.
    `device`: the torch device the benchmark ran on (default: cuda if present, else cpu)."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    if device is None:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"hostname": platform.node(), "cpu_model": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "device": str(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        info["memory"] = Path("/proc/meminfo").read_text().split("\n")[0].split(":", 1)[1].strip()
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        info["cuda"] = torch.version.cuda
    repo = Path(__file__).resolve().parents[1]
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout
        info["git_commit"] = git("rev-parse", "HEAD").strip()
        info["git_dirty"] = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def results_path(name: str, out=None) -> Path:
    """Where a run's JSON goes: `out` if given, else bench-results/<name>-<timestamp>.json
    at the repo root (git ignores it); its folder is created."""
    import time

    path = Path(out) if out else Path(__file__).resolve().parents[1] / "bench-results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, payload: dict, out=None) -> Path:
    """Write `payload` as indented JSON to `results_path(name, out)`; returns the path."""
    import json

    path = results_path(name, out)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
