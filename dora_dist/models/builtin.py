"""The built-in default model: a tiny Llama and a BPE tokenizer trained locally on the synthetic corpus.

Both are deterministic (fixed corpus, fixed seed) and saved once, atomically, as a normal transformers checkpoint
in <cache>/tiny-llama-<hash>/ so every process and every later run loads the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dora_dist.config import BUILTIN_NAME  # noqa: F401  (re-exported: models.BUILTIN_NAME)

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

#: architecture of the built-in model (vocab_size is set from the trained tokenizer, rounded up to 64)
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.05,
}
TOKENIZER_VOCAB = 1024
INIT_SEED = 1234
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DORA_DIST_CACHE", Path.home() / ".cache" / "dora_dist"))


def _arch(overrides: dict | None) -> dict:
    arch = dict(TINY_LLAMA)
    arch.update(overrides or {})
    return arch


def builtin_model_dir(cfg: Config) -> Path:
    from dora_dist.data.synthetic import CORPUS_VERSION

    root = Path(cfg.model.cache_dir) if cfg.model.cache_dir else default_cache_dir()
    key = json.dumps(
        {
            "arch": _arch(cfg.model.config),
            "vocab": TOKENIZER_VOCAB,
            "seed": INIT_SEED,
            "corpus": CORPUS_VERSION,
            "v": 1,
        },
        sort_keys=True,
    )
    return root / f"tiny-llama-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def train_builtin_tokenizer():
    """Byte-level BPE trained on the synthetic corpus, wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dora_dist.data.synthetic import tokenizer_training_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TINY_LLAMA["max_position_embeddings"]
    return fast


def _build(cfg: Config, target: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_builtin_tokenizer()
    arch = _arch(cfg.model.config)
    arch.pop("model_type", None)
    vocab = -(-len(tok) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **arch,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(INIT_SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.config.use_cache = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_base(name: str, cache_dir: str | None = None) -> str:
    """A base model named by an adapter (base_model_name_or_path) or --base: the built-in name, which the trainer
    stores because another machine can resolve it, becomes this machine's directory of the built-in model (built
    first when missing); any other name is returned as given."""
    if name != BUILTIN_NAME:
        return name
    from types import SimpleNamespace

    # ensure_builtin_model reads only cfg.model.cache_dir and cfg.model.config
    stand_in = SimpleNamespace(model=SimpleNamespace(cache_dir=cache_dir, config=None))
    return str(ensure_builtin_model(stand_in))  # type: ignore[arg-type]


def ensure_builtin_model(cfg: Config, env: DistEnv | None = None) -> Path:
    """Directory of the built-in model, building it first if needed (rank 0 builds, the others wait)."""
    target = builtin_model_dir(cfg)
    if (target / "config.json").exists():
        return target
    if env is not None and env.distributed:
        with env.main_process_first():
            if not (target / "config.json").exists():
                _build(cfg, target)
    else:
        _build(cfg, target)
    return target
