"""qlora-serve: one NF4 double-quantized base model, many LoRA adapters, served over gRPC."""

__version__ = "0.1.0"
