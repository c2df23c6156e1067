"""The files of an adapter directory, named once: what a PEFT adapter holds, what the
registry stores beside it, what an upload may carry."""

from __future__ import annotations

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's pickle checkpoints: loading one can run code, so they are refused by name.
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
METADATA_FILE = "qlora_serve_metadata.json"  # written by training/export.py
README_FILE = "README.md"
# The chat template training rendered the data with (`qlora-serve train --chat-template`,
# named as transformers' save_pretrained names it); chat requests to the adapter use it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# A served adapter needs these (they make its digest, see store.py) ...
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# ... and these are copied with it when present (stored; only the chat template, which
# serving reads, is part of the digest, see store.py); anything
# else in a source directory (checkpoints, tokenizer, training_args.bin) is ignored.
OPTIONAL_FILES = (README_FILE, METADATA_FILE, CHAT_TEMPLATE_FILE)
ADAPTER_FILES = REQUIRED_FILES + OPTIONAL_FILES
# Key in adapter_config.json naming the base the adapter was trained on.
FINGERPRINT_KEY = "qlora_serve_base_fingerprint"
