"""Shared test helper: make PEFT adapter variants on disk (imported as
`from adapter_files import make_variant`, like `from conftest import ...`)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def make_variant(src: Path, dst: Path, *, scale: float = 1.0, tensors=None, config=None) -> Path:
    """Copy a PEFT adapter dir, optionally scaling its weights (a new digest),
    editing its tensors (callable on the dict) or its config (dict update)."""
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v * scale for k, v in load_file(str(src / WEIGHTS)).items()}
    if tensors is not None:
        state = tensors(state)
    save_file(state, str(dst / WEIGHTS))
    cfg = json.loads((src / CONFIG).read_text())
    cfg.update(config or {})
    (dst / CONFIG).write_text(json.dumps(cfg))
    return dst


def corrupt(directory: Path) -> None:
    """Flip bytes in the middle of a stored weights file, as a bad disk would."""
    path = Path(directory) / WEIGHTS
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        chunk = f.read(16)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
