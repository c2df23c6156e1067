"""Base-model fingerprint: a short, stable id of "which base model is this".

An adapter is only meaningful on the base it was trained on. Module names and
shapes (checked by `check_fits_base`) catch a different architecture; the
fingerprint also catches a different *checkpoint* of the same architecture
(e.g. Llama-3-8B vs Llama-3-8B-Instruct), whose shapes are identical.

What the fingerprint covers (FINGERPRINT_VERSION 1):
- the architecture-defining config fields in `_ARCH_KEYS` (model_type,
  architectures, hidden/intermediate sizes, layer/head counts, head_dim,
  vocab size, tied embeddings); for multimodal configs the `text_config` part;
- when `model_dir_or_id` is a local directory: the weights' identity, i.e. for
  every `*.safetensors` file its name, size in bytes, its safetensors header
  (tensor names, dtypes, shapes, offsets) and `_SAMPLE_BYTES` from the start
  and from the end of its data, plus the bytes of any `*.safetensors.index.json`.
  Reads at most ~2 * _SAMPLE_BYTES + header per file, so a 100 GB base
  fingerprints in milliseconds; it never hashes the full weights;
- when it is a hub id instead: the id string and `_commit_hash` if the config
  carries one (the weights are not on disk to look at).
What it does NOT cover: the directory path (caches differ per machine), the
quantization used at load time (NF4 is applied on load, same files), tokenizer
files, generation config.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = 1
# Length of the returned hex string (64 bits: collisions are not a concern
# among the handful of bases one deployment sees).
FINGERPRINT_HEX_CHARS = 16
_SAMPLE_BYTES = 1 << 20  # 1 MiB from each end of each weights file
_ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def _config_dict(config: Any) -> dict:
    """Accept a plain dict or a transformers `PretrainedConfig`."""
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict or have to_dict(), got {type(config).__name__}")


def _arch_fields(config: dict) -> dict:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    out = {key: text.get(key, config.get(key)) for key in _ARCH_KEYS}
    # model_type/architectures describe the outer model even for multimodal ones.
    out["model_type"] = config.get("model_type")
    out["architectures"] = config.get("architectures")
    return out


def _safetensors_identity(path: Path, h: "hashlib._Hash") -> None:
    """Hash name, size, header and two data samples of one safetensors file."""
    size = path.stat().st_size
    h.update(f"file\0{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            # A corrupt header length must not make us read gigabytes.
            h.update(f.read(min(header_len, size - 8, 100 << 20)))
        if size - f.tell() <= 2 * _SAMPLE_BYTES:
            h.update(f.read())  # small file: all of it
        else:
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))


def base_fingerprint(model_dir_or_id: str | os.PathLike, config: Any) -> str:
    """Return a 16-hex-char fingerprint of a base model (see the module docstring
    for exactly what it covers). `config` is the base's config.json as a dict
    (or a `PretrainedConfig`). Deterministic across machines and processes."""
    cfg = _config_dict(config)
    h = hashlib.sha256()
    h.update(f"qlora-serve-base-fingerprint\0v{FINGERPRINT_VERSION}\0".encode())
    h.update(json.dumps(_arch_fields(cfg), sort_keys=True, default=str).encode())
    model_dir = Path(model_dir_or_id)
    if model_dir.is_dir():
        files = sorted(model_dir.glob("*.safetensors"))
        for path in files:
            _safetensors_identity(path, h)
        for index in sorted(model_dir.glob("*.safetensors.index.json")):
            h.update(f"index\0{index.name}\0".encode())
            h.update(index.read_bytes())
        if not files:
            # Legacy pickle weights (or none): at least bind names and sizes.
            for path in sorted(p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")):
                h.update(f"file\0{path.name}\0{path.stat().st_size}\0".encode())
    else:
        h.update(f"hub\0{model_dir_or_id}\0{cfg.get('_commit_hash') or ''}\0".encode())
    return h.hexdigest()[:FINGERPRINT_HEX_CHARS]
