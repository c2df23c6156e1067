"""`qlora-serve train` and `qlora-serve merge` subcommands (hooked into the main
parser by server/cli.py `build_parser`).

One flag per TrainConfig field (`--lora-r` for `lora_r`, booleans as
`--packing/--no-packing`); flags default to None so that a `--config` file value
is only overridden by a flag the user actually typed.
"""

from __future__ import annotations

import argparse
import sys

from qlora_serve.errors import QloraServeError
from qlora_serve.options import add_flags

from .config import TrainConfig


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand; its func(args) -> exit code."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune a QLoRA adapter on a JSONL dataset",
        description="QLoRA fine-tuning: NF4 double-quantized base + LoRA, paged AdamW. See training/README.md.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys are these flags' names (flags override it)")
    add_flags(p, TrainConfig, overrides=True, metavars={
        "register": "ADDRESS", "base": "DIR_OR_HUB_ID", "data": "FILE.jsonl", "eval_data": "FILE.jsonl", "out": "DIR"})
    p.set_defaults(func=run_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults < --config file < explicit flags."""
    overrides = {name: getattr(args, name, None) for name in TrainConfig.field_names()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "config", None):
        return TrainConfig.from_toml(args.config, **overrides)
    return TrainConfig.from_dict(overrides, source="command line")


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except QloraServeError as exc:
        print(f"qlora-serve train: error: {exc}", file=sys.stderr)
        return 2
    if result.registered is not None:
        print(f"registered as {result.metadata['name']}: {result.registered}", file=sys.stderr)
    print(result.adapter_dir)
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `merge` subcommand; its func(args) -> exit code."""
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into the unquantized base and save a standalone model",
        description="Merge a LoRA adapter into the base loaded unquantized (--dtype; default bf16 on GPU, fp32 on CPU), "
        "check that greedy output equals base+adapter on a sample prompt, and save model + tokenizer "
        "(safetensors shards of at most --max-shard-size).",
    )
    p.add_argument("--base", default=None, metavar="DIR_OR_HUB_ID", help="base model (default: the embedded demo base)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--prompt", default="hello world", help="sample prompt for the equality check (default: 'hello world')")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared (default: 16)")
    from .merge import DEFAULT_MAX_SHARD_SIZE, DTYPES

    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the merged weights (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help=f"largest safetensors file written, e.g. 5GB, 500MB, 2GiB (default: {DEFAULT_MAX_SHARD_SIZE}); "
                        "several shards get a model.safetensors.index.json")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    try:
        result = merge(args.base, args.adapter, args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                       dtype=args.dtype, max_shard_size=args.max_shard_size)
    except QloraServeError as exc:
        print(f"qlora-serve merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged ({result.dtype}); greedy output matches base+adapter; written to {result.out_dir} "
          f"({len(result.weight_files)} safetensors file(s))", file=sys.stderr)
    print(result.out_dir)
    return 0
