"""Tiny random HF decoders for tests (8 heads in 4 groups, so TP=2 and group pruning work)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: str | Path, *, seed: int = 0, tie: bool = True, layers: int = 4,
                    hidden: int = 64, heads: int = 8, groups: int = 4, ffn: int = 128,
                    vocab: int = 250, family: str = "llama", tokenizer: bool = False,
                    head_dim: int | None = None, random_biases: bool = False, **config) -> Path:
    """A tiny random HF decoder of `family` (llama | mistral | qwen2 | qwen3 | nemotron), built from its
    transformers config class. With tokenizer=True a byte-level BPE of 320 tokens is trained and saved
    beside the weights. `head_dim` defaults to hidden // heads; `random_biases` draws every bias (qwen2
    inits its QKV biases to zero); other keyword arguments go to the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if tokenizer:
        vocab = 320
        add_tiny_tokenizer(path, vocab)
    eps_key = "norm_eps" if family == "nemotron" else "rms_norm_eps"
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups,
        head_dim=head_dim or hidden // heads, rope_theta=10000.0, tie_word_embeddings=tie,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **{eps_key: 1e-5},
    )
    kwargs.update(config)
    cfg = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms so a mis-mapped norm weight is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif random_biases and name.endswith("bias"):
                p.normal_()
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def add_tiny_tokenizer(path: str | Path, vocab: int = 320) -> Path:
    """Train a small byte-level BPE on public-domain text so tiny models work with the launchers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(__file__).resolve().parent / "data" / "hamlet_excerpt.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return Path(path)


def save_random_tokens(path: Path, vocab: int, shape: tuple[int, int], seed: int = 1) -> Path:
    """Random token ids [batch, seq] < vocab, saved with torch.save (the forward workers' input)."""
    torch.manual_seed(seed)
    torch.save(torch.randint(0, vocab, shape), path)
    return path


def hf_logits(path: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits of the HF model in `path` on `tokens` (the reference of every bridge test)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(tokens).logits
