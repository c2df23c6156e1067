"""GPU checks: run where torch sees CUDA (skipped cleanly elsewhere, see conftest).

They are the CPU end-to-end guarantees restated on the device the product is
for: the base is NF4 + double quant on the GPU, and mixed-adapter batches give
each request the tokens plain PEFT gives it alone.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

pytestmark = pytest.mark.cuda


def test_base_is_nf4_on_the_gpu(start_server):
    import bitsandbytes as bnb

    server = start_server(device="cuda", compute_dtype="bfloat16")
    model = server.runtime.engine.base.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(l.weight.device.type == "cuda" for l in layers)
    assert all(l.weight.quant_state.quant_type == "nf4" and l.weight.quant_state.nested for l in layers)


def test_mixed_adapter_batch_equals_plain_peft_on_gpu(start_server, demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_serve.server.client import Client

    # float32 compute: batch composition must not change the arithmetic (see test_e2e_inference).
    server = start_server(device="cuda", compute_dtype="float32")
    prompt, n = "hello world", 12
    with Client(f"localhost:{server.port}") as c, cf.ThreadPoolExecutor(3) as pool:
        futures = {a: pool.submit(c.generate, prompt, adapter=a, max_new_tokens=n) for a in ("", "pirate", "poet")}
        got = {a: list(f.result().token_ids) for a, f in futures.items()}

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(demo.base)
    ids = tok(prompt, return_tensors="pt").input_ids.cuda()
    for adapter, want in got.items():
        base = AutoModelForCausalLM.from_pretrained(demo.base, quantization_config=quant, device_map={"": 0})
        model = PeftModel.from_pretrained(base, demo.adapters[adapter]) if adapter else base
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        ref = out[0, ids.shape[1]:].tolist()
        assert want == ref[:len(want)], adapter
