"""The embedded default: a tiny Llama-architecture base and demo adapters, built offline.

`qlora-serve serve` with no flags must work on a fresh machine with no model hub,
so the demo model is *built* here: a word-level tokenizer over an embedded corpus
(server/demo_corpus.py), a tiny Llama trained briefly on it so greedy output is
readable words, and two LoRA adapters trained on the corpus's pirate and poet
variants (server/demo_train.py), written with `save_pretrained` and loaded back
through the same `from_pretrained` path a real hub id or local directory takes.
Builds are deterministic and cached, so a second start is instant.

`build_tiny_base` / `build_random_adapter` (random weights, byte-level BPE) stay for
tests that need a model of a given shape rather than one that reads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_serve.adapters.layout import CONFIG_FILE

# Bump when the recipe changes so stale caches are rebuilt, never reused.
DEMO_RECIPE_VERSION = 3  # 2: chat template; 3: word-level tokenizer, trained base and adapters

# "role: content" lines, then "assistant: " to prompt a reply: the layout the trainer
# uses for `messages` data when a tokenizer has no template (training/data.py).
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# The byte-level BPE corpus of the random-weight builds (`build_tiny_base`).
_CORPUS = [
    "hello world, this is qlora-serve, a server for many LoRA adapters on one quantized base.",
    "The quick brown fox jumps over the lazy dog while the model counts tokens.",
    "Adapters change what the model says; the base stays resident in four-bit NormalFloat.",
    "one two three four five six seven eight nine ten eleven twelve",
    "Question: what is the capital of France? Answer: Paris.",
    "def add(a, b):\n    return a + b\n",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny Llama model. All Linear in_features are multiples of 64
    because bitsandbytes' packed 4-bit CPU path needs it (see DESIGN.md)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    vocab_size: int = 384
    seed: int = 0


@dataclass(frozen=True)
class DemoAdapterSpec:
    """A demo LoRA adapter. `style` ("pirate" / "poet", server/demo_corpus.py): trained
    on that style's text; empty: random A and B (scale `init_scale`), for tests."""

    name: str
    r: int
    alpha: int
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seed: int = 1
    init_scale: float = 0.5
    style: str = ""


DEMO_ADAPTERS = (
    DemoAdapterSpec(name="pirate", r=8, alpha=16, seed=11, style="pirate"),
    DemoAdapterSpec(name="poet", r=4, alpha=8, seed=22, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                    style="poet"),
)
# The demo base's shape; its vocabulary is the word list's size (vocab_size is unused).
DEMO_BASE = TinyModelSpec()
# Training runs (steps, batch rows, tokens per row, peak lr): measured to build in
# seconds on 2 cores and give greedy output that reads (tests/test_demo.py).
BASE_RUN = dict(steps=150, batch=16, seq_len=32, lr=3e-3)
ADAPTER_RUN = dict(steps=60, batch=16, seq_len=32, lr=1e-2)


@dataclass(frozen=True)
class DemoPaths:
    """Where the built demo lives: the base directory and one directory per adapter."""

    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """`$QLORA_SERVE_CACHE`, else `$XDG_CACHE_HOME/qlora-serve`, else `~/.cache/qlora-serve`."""
    env = os.environ.get("QLORA_SERVE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "qlora-serve"


def build_tokenizer(out_dir: Path, vocab_size: int):
    """Train a byte-level BPE tokenizer on the embedded corpus and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = DEMO_CHAT_TEMPLATE  # so chat `messages` requests work on the demo
    fast.save_pretrained(out_dir)
    return fast


def build_word_tokenizer(out_dir: Path):
    """A word-level tokenizer over the demo corpus's words (lower-cased input, words
    and punctuation split apart, unknown words as <unk>), saved to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qlora_serve.server.demo_corpus import all_words

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + all_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Joins words with spaces, no space before punctuation ("hello, world!").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = DEMO_CHAT_TEMPLATE  # so chat `messages` requests work on the demo
    fast.save_pretrained(out_dir)
    return fast


def _new_llama(spec: TinyModelSpec, tok, vocab_size: int):
    """A fresh fp32 tiny Llama (seeded init) whose special ids are `tok`'s."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def build_tiny_base(out_dir: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a random-weight tiny Llama model plus byte-level BPE tokenizer to `out_dir`
    (fp32 safetensors): a model of a given shape for tests, not one that reads."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir, spec.vocab_size)
    model = _new_llama(spec, tok, spec.vocab_size)
    # A wider init than the default makes the random model's greedy output vary
    # with the prompt instead of collapsing onto one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return out_dir


def _corpus_ids(tok, style: str, n_lines: int, seed: int) -> list[list[int]]:
    from qlora_serve.server.demo_corpus import corpus

    return [tok(line, add_special_tokens=False)["input_ids"] for line in corpus(style, n_lines, seed)]


def build_demo_base(out_dir: Path, spec: TinyModelSpec = DEMO_BASE):
    """Write the demo base to `out_dir` and return (model, tokenizer): the word-level
    tokenizer and a tiny Llama trained (fp32) mostly on plain sentences, with some
    pirate and poet lines so every word has a trained embedding for the adapters to
    steer towards. No eos in the text: the base writes on until max_new_tokens."""
    from qlora_serve.server.demo_train import train_lm, windows

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(out_dir)
    model = _new_llama(spec, tok, len(tok))
    lines = _corpus_ids(tok, "plain", 300, 1) + _corpus_ids(tok, "pirate", 60, 2) + _corpus_ids(tok, "poet", 60, 3)
    run = BASE_RUN
    train_lm(model, windows(lines, run["seq_len"], run["batch"], run["steps"], spec.seed), run["lr"], run["steps"])
    model.save_pretrained(out_dir)
    return model, tok


def _save_adapter(peft_model, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    # PEFT records the base path it saw; the tmp build path means nothing to users.
    cfg_path = out_dir / CONFIG_FILE
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = "qlora-serve-demo-tiny-llama"
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return out_dir


def build_style_adapter(base_dir: Path, out_dir: Path, spec: DemoAdapterSpec) -> Path:
    """Train a PEFT LoRA adapter on `spec.style`'s lines of the demo corpus (fp32 base,
    the LoRA weights only) and save it to `out_dir` as a plain PEFT adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return _train_style_adapter(model, AutoTokenizer.from_pretrained(base_dir), out_dir, spec)


def _train_style_adapter(model, tok, out_dir: Path, spec: DemoAdapterSpec) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_serve.server.demo_train import train_lm, windows

    torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    run = ADAPTER_RUN
    batches = windows(_corpus_ids(tok, spec.style, 300, spec.seed), run["seq_len"], run["batch"], run["steps"],
                      spec.seed)
    train_lm(peft_model, batches, run["lr"], run["steps"])
    return _save_adapter(peft_model, out_dir)


def build_random_adapter(base_dir: Path, out_dir: Path, spec: DemoAdapterSpec) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for `base_dir`.

    The base is loaded unquantized: adapters are defined on the original module shapes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * spec.init_scale / (p.shape[-1] ** 0.5))
    return _save_adapter(peft_model, out_dir)


def _build_demo(root: Path) -> None:
    """Build the base and the demo adapters under `root`, on one torch thread: these
    matmuls are too small to gain from more, and on a busy machine (CI, shared
    hosts) threads that spin-wait for each other made the build 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = build_demo_base(root / "base")
        for spec in DEMO_ADAPTERS:  # each on its own copy of the trained base (no reload)
            _train_style_adapter(copy.deepcopy(model), tok, root / "adapters" / spec.name, spec)
    finally:
        torch.set_num_threads(threads)


def ensure_demo(cache_dir: Path | None = None) -> DemoPaths:
    """Build the demo base and adapters once and return their paths (cached, atomic)."""
    root = (cache_dir or default_cache_dir()) / f"demo-v{DEMO_RECIPE_VERSION}"
    marker = root / "READY.json"
    paths = DemoPaths(base=root / "base", adapters={a.name: root / "adapters" / a.name for a in DEMO_ADAPTERS})
    if marker.exists():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a crash never leaves a half-built demo.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root.parent))
    try:
        _build_demo(tmp)
        (tmp / "READY.json").write_text(
            json.dumps({"recipe": DEMO_RECIPE_VERSION, "base": asdict(DEMO_BASE)}, indent=2)
        )
        if root.exists() and not marker.exists():
            shutil.rmtree(root)  # an interrupted build from an older layout
        try:
            os.replace(tmp, root)
        except OSError:
            if not marker.exists():  # lost a race with a concurrent builder: theirs is complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths
