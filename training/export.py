"""Writing the finished adapter: a plain PEFT directory plus `qlora_serve_metadata.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.layout import METADATA_FILE  # noqa: F401 (re-export)
METADATA_VERSION = 1


def fingerprint_of(base: str, model_config) -> dict[str, str]:
    """{"base_fingerprint": ..., "fingerprint_kind": ...} for the metadata file: the
    id the registry compares (`qlora_serve.adapters.fingerprint.base_fingerprint`)."""
    return {"base_fingerprint": base_fingerprint(base, model_config), "fingerprint_kind": "qlora-serve-v1"}


def save_adapter(peft_model, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """Save adapter_config.json + adapter_model.safetensors (loadable by
    `PeftModel.from_pretrained`) and the metadata file into `out_dir`.
    adapter_config.json stays exactly PEFT's (an extra key makes PEFT warn on every
    load); the base fingerprint lives in the metadata file, where the registry reads
    it, so a server with a different base refuses the adapter at registration."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    write_metadata(out_dir, metadata)
    return out_dir


def write_metadata(out_dir: Path, metadata: dict[str, Any]) -> Path:
    path = Path(out_dir) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"metadata_version": METADATA_VERSION, **metadata}, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
