"""Tiny randomly-initialised models and a byte-level tokenizer for tests: no downloads.

`build_tiny(family)` returns a `core.loaded_model.LoadedModel` for each supported family; all share
`VOCAB_SIZE`, so every model works with `tiny_tokenizer()`.
"""
from __future__ import annotations

import torch

from core.loaded_model import LoadedModel, wrap_model

FAMILY_NAMES = ("llama", "gemma3", "opt", "gpt2", "gpt_neox")

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB_SIZE = 256 + len(SPECIALS)  # every byte, then the specials
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(256, VOCAB_SIZE)

HIDDEN = 64
HEADS = 4
KV_HEADS = 2  # llama / gemma3: GQA with 2 query heads per kv head
INTERMEDIATE = 128
LAYERS = 2
MAX_POSITIONS = 256


def tiny_config(family: str):
    """The transformers config of the tiny model for `family`."""
    import transformers as tf

    common_ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "llama":
        return tf.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **common_ids,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            head_dim=HIDDEN // HEADS, max_position_embeddings=MAX_POSITIONS, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **common_ids,
        )
    if family == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
            max_position_embeddings=MAX_POSITIONS, **common_ids,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
            n_head=HEADS, n_positions=MAX_POSITIONS, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25, **common_ids,
        )
    raise ValueError(f"no tiny config for family {family!r}")


def build_tiny_module(family: str, seed: int = 0):
    """The bare transformers model (seeded, eval mode, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def build_tiny(family: str, tokenizer=None, seed: int = 0) -> LoadedModel:
    """A tiny random causal LM of `family` wrapped like a loaded model."""
    return wrap_model(build_tiny_module(family, seed), tokenizer=tokenizer, model_id=f"tiny-{family}")


def random_windows(n: int, seqlen: int, seed: int = 0, high: int = 256) -> torch.Tensor:
    """n windows of seqlen random token ids in [0, high) (bytes by default: no special token), seeded."""
    return torch.randint(0, high, (n, seqlen), generator=torch.Generator().manual_seed(seed))


_TRAIN_TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def tiny_tokenizer():
    """A byte-level tokenizer: ids 0-255 are the bytes, then <pad> <bos> <eos> <unk>.

    No merges, so any text round-trips and every id is below VOCAB_SIZE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_order = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_order)}
    for offset, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok


def _byte_of(ch: str) -> int:
    """GPT-2's bytes_to_unicode inverse: the byte a ByteLevel stand-in character encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    code = ord(ch)
    if code in printable:
        return code
    # the others are mapped, in byte order, to 256, 257, ...
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]
