"""Per-family adapters: where a causal LM keeps its decoder blocks, prunable linears, heads and
MLP channels.

Every pruning method works on a *canonical* weight view of shape (d_out, d_in). Most families
use nn.Linear, whose weight already has that layout; GPT-2 uses transformers' Conv1D, whose
weight is (d_in, d_out), so its canonical view is a transpose (a view: in-place edits reach
the parameter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionLayout:
    """Names (relative to a block) of the attention projections.

    Either separate q/k/v or one fused `qkv` projection (GPT-2 c_attn, GPT-NeoX
    query_key_value). `fused_interleaved` is True where the fused output interleaves q, k, v
    per head (GPT-NeoX) rather than concatenating them (GPT-2).
    """

    out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    fused_interleaved: bool = False


@dataclass(frozen=True)
class MlpLayout:
    """`inputs` are the projections whose output rows are MLP channels (up, gate, fc1);
    `out` is the projection whose input columns are MLP channels (down, fc2)."""

    inputs: tuple[str, ...]
    out: str


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    # relative linear name -> short matrix type shown in plots (q, k, v, o, gate, up, down...)
    linears: dict[str, str]
    attention: AttentionLayout
    mlp: MlpLayout
    conv1d: bool = False  # weights stored (d_in, d_out): GPT-2
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.blocks_path.split("."):
            obj = getattr(obj, part)
        return obj

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def linear_modules(self, block: nn.Module) -> dict[str, nn.Module]:
        """Relative name -> module, in forward order."""
        return {name: block.get_submodule(name) for name in self.linears}

    def weight_view(self, module: nn.Module) -> torch.Tensor:
        """The (d_out, d_in) view of a prunable module's weight."""
        return module.weight.data.t() if self.conv1d else module.weight.data

    def matrix_type(self, rel_name: str) -> str:
        return self.linears[rel_name]


_LLAMA_LINEARS = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_LLAMA_ATTN = AttentionLayout(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.o_proj")
_LLAMA_MLP = MlpLayout(inputs=("mlp.gate_proj", "mlp.up_proj"), out="mlp.down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        blocks_path="model.layers",
        linears=_LLAMA_LINEARS,
        attention=_LLAMA_ATTN,
        mlp=_LLAMA_MLP,
        notes="Llama, SmolLM2, Mistral, Qwen2/3: RoPE, GQA, gated SiLU MLP.",
    ),
    Family(
        name="gemma3",
        model_types=("gemma3_text", "gemma3", "gemma2", "gemma"),
        blocks_path="model.layers",
        linears=_LLAMA_LINEARS,
        attention=_LLAMA_ATTN,
        mlp=_LLAMA_MLP,
        notes="Gemma 2/3: sliding and global attention layers, gated GELU MLP.",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks_path="model.decoder.layers",
        linears={
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.out_proj": "o",
            "fc1": "fc1",
            "fc2": "fc2",
        },
        attention=AttentionLayout(
            q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"
        ),
        mlp=MlpLayout(inputs=("fc1",), out="fc2"),
        notes="OPT: learned positions, ReLU MLP, biases everywhere.",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks_path="transformer.h",
        linears={"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"},
        attention=AttentionLayout(qkv="attn.c_attn", out="attn.c_proj"),
        mlp=MlpLayout(inputs=("mlp.c_fc",), out="mlp.c_proj"),
        conv1d=True,
        notes="GPT-2: Conv1D layers with transposed weights, fused qkv.",
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks_path="gpt_neox.layers",
        linears={
            "attention.query_key_value": "qkv",
            "attention.dense": "o",
            "mlp.dense_h_to_4h": "fc1",
            "mlp.dense_4h_to_h": "fc2",
        },
        attention=AttentionLayout(qkv="attention.query_key_value", out="attention.dense", fused_interleaved=True),
        mlp=MlpLayout(inputs=("mlp.dense_h_to_4h",), out="mlp.dense_4h_to_h"),
        notes="GPT-NeoX / Pythia: fused per-head interleaved qkv, parallel residual.",
    ),
)


def supported_summary() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_for_config(config) -> Family | None:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


@dataclass(frozen=True)
class HeadInfo:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


# Where each family's config keeps its context length (the most positions one forward takes):
# Llama / Mistral / Qwen, Gemma 2/3, OPT and GPT-NeoX call it max_position_embeddings, GPT-2
# n_positions (older GPT-2 configs n_ctx). OPT's learned position table has 2 extra rows (its
# positions start at offset 2), so max_position_embeddings is already the usable length there.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> int | None:
    """The most tokens the model takes in one window, from its config; None when it says nothing."""
    text = getattr(config, "text_config", None) or config
    keys = ("n_positions",) + _CONTEXT_KEYS if getattr(text, "model_type", None) == "gpt2" else _CONTEXT_KEYS
    for key in keys:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def head_info(config) -> HeadInfo:
    """Head counts from a config, whatever names the family uses for them."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return HeadInfo(num_heads=int(heads), num_kv_heads=int(kv), head_dim=int(head_dim))
