"""AdapterRegistry(read_only=True): a reader process beside the registry's one writer
(the Ray replicas' shared registry). Real SQLite files, real adapter directories."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.registry import AdapterRegistry
from qlora_serve.errors import FailedPrecondition, NotFound


@pytest.fixture(scope="module")
def args(demo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp = base_fingerprint(demo.base, json.loads((demo.base / "config.json").read_text()))
    return dict(base_fingerprint=fp, linear_shapes=shapes, max_rank=16, allowed_roots=[demo.adapters["poet"].parent])


def test_reader_sees_the_writers_commits_at_once(tmp_path, demo, args):
    writer = AdapterRegistry(tmp_path, **args)
    reader = AdapterRegistry(tmp_path, read_only=True, **args)  # beside the writer's lock: no refusal
    try:
        rec = writer.register_path("poet", demo.adapters["poet"])
        assert reader.resolve("poet").digest == rec.digest
        writer.register_path("poet", demo.adapters["pirate"])
        writer.set_alias("poet", "default", 2)
        assert reader.resolve("poet").version == 2  # an alias move reaches the reader
        reader.verify(reader.get("poet", 1))  # reads the writer's store files by digest
        writer.delete("poet")
        with pytest.raises(NotFound):
            reader.resolve("poet")
        with pytest.raises(FailedPrecondition, match="read-only"):  # a reader never writes the catalogue
            reader.delete_alias("poet", "default")
    finally:
        reader.close()
        writer.close()


def test_reader_without_a_writer_says_what_to_start(tmp_path, args):
    with pytest.raises(FailedPrecondition, match="start its writer first"):
        AdapterRegistry(tmp_path / "empty", read_only=True, **args)
