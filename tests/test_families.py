"""Family adapters on tiny random models: prunable linears, weight views, heads, facts, fingerprint."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.families import FAMILIES, family_for_config, head_info
from core.fingerprint import fingerprint
from tiny import FAMILY_NAMES, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, tiny_config

H, I = HIDDEN, INTERMEDIATE
HD = HIDDEN // HEADS
KV = KV_HEADS * HD

_GATED = {  # llama and gemma3: relative name -> (matrix type, (d_out, d_in))
    "self_attn.q_proj": ("q", (H, H)),
    "self_attn.k_proj": ("k", (KV, H)),
    "self_attn.v_proj": ("v", (KV, H)),
    "self_attn.o_proj": ("o", (H, H)),
    "mlp.gate_proj": ("gate", (I, H)),
    "mlp.up_proj": ("up", (I, H)),
    "mlp.down_proj": ("down", (H, I)),
}
EXPECTED = {
    "llama": ("model.layers", 2, _GATED),
    "gemma3": ("model.layers", 3, _GATED),
    "opt": ("model.decoder.layers", 2, {
        "self_attn.q_proj": ("q", (H, H)),
        "self_attn.k_proj": ("k", (H, H)),
        "self_attn.v_proj": ("v", (H, H)),
        "self_attn.out_proj": ("o", (H, H)),
        "fc1": ("fc1", (I, H)),
        "fc2": ("fc2", (H, I)),
    }),
    "gpt2": ("transformer.h", 2, {
        "attn.c_attn": ("qkv", (3 * H, H)),
        "attn.c_proj": ("o", (H, H)),
        "mlp.c_fc": ("fc1", (I, H)),
        "mlp.c_proj": ("fc2", (H, I)),
    }),
    "gpt_neox": ("gpt_neox.layers", 2, {
        "attention.query_key_value": ("qkv", (3 * H, H)),
        "attention.dense": ("o", (H, H)),
        "mlp.dense_h_to_4h": ("fc1", (I, H)),
        "mlp.dense_4h_to_h": ("fc2", (H, I)),
    }),
}
EXPECTED_HEADS = {  # heads, kv heads, head_dim
    "llama": (HEADS, KV_HEADS, HD),
    "gemma3": (HEADS, KV_HEADS, HD),
    "opt": (HEADS, HEADS, HD),
    "gpt2": (HEADS, HEADS, HD),
    "gpt_neox": (HEADS, HEADS, HD),
}


def test_every_family_has_a_tiny_model():
    assert {f.name for f in FAMILIES} == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prunable_lists_expected_linears_in_order(tiny_model, family):
    lm = tiny_model(family)
    assert lm.family.name == family
    prefix, n_layers, linears = EXPECTED[family]
    assert len(lm.blocks) == n_layers
    expected_names = [f"{prefix}.{i}.{rel}" for i in range(n_layers) for rel in linears]
    prunable = lm.prunable()
    assert list(prunable) == expected_names
    modules = dict(lm.model.named_modules())
    for name, module in prunable.items():
        rel = name.split(".", prefix.count(".") + 2)[-1]
        mtype, shape = linears[rel]
        assert module is modules[name]
        assert lm.family.matrix_type(rel) == mtype, name
        view = lm.family.weight_view(module)
        assert tuple(view.shape) == shape, name
        if family != "gpt2":
            assert isinstance(module, nn.Linear), name
            assert view.data_ptr() == module.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_and_mlp_layouts_name_real_linears(tiny_model, family):
    lm = tiny_model(family)
    fam = lm.family
    att = fam.attention
    named = [att.out, *(n for n in (att.q, att.k, att.v, att.qkv) if n)]
    assert (att.qkv is None) == (att.q is not None and att.k is not None and att.v is not None)
    for rel in [*named, *fam.mlp.inputs, fam.mlp.out]:
        assert rel in fam.linears, rel
        assert fam.linear_modules(lm.blocks[0])[rel] is lm.blocks[0].get_submodule(rel)
    # MLP channels: the rows of every input projection, the columns of the output one.
    block = lm.blocks[0]
    channels = {fam.weight_view(block.get_submodule(r)).shape[0] for r in fam.mlp.inputs}
    assert channels == {fam.weight_view(block.get_submodule(fam.mlp.out)).shape[1]} == {INTERMEDIATE}


def test_gpt2_conv1d_view_is_a_transpose_that_reaches_the_parameter(tiny_model):
    lm = tiny_model("gpt2")
    module = lm.blocks[0].get_submodule("mlp.c_fc")
    assert type(module).__name__ == "Conv1D"
    assert tuple(module.weight.shape) == (H, I)  # stored (d_in, d_out)
    view = lm.family.weight_view(module)
    assert tuple(view.shape) == (I, H)
    assert torch.equal(view, module.weight.data.t())
    assert view.data_ptr() == module.weight.data_ptr()  # a view, not a copy

    x = torch.randn(3, 5, H)
    y_ref = module(x)
    y_view = x @ view.T + module.bias
    torch.testing.assert_close(y_view, y_ref)

    # In-place edits through the view land in the parameter and change the module's output.
    view[7, 3] = 123.0
    assert module.weight[3, 7].item() == 123.0
    view[:, :10].zero_()
    assert torch.count_nonzero(module.weight[:10, :]) == 0
    torch.testing.assert_close(module(x), x @ view.T + module.bias)
    assert not torch.allclose(module(x), y_ref)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "gpt2"])
def test_linear_view_is_the_weight_itself(tiny_model, family):
    lm = tiny_model(family)
    name, module = next(iter(lm.prunable().items()))
    view = lm.family.weight_view(module)
    view[0, 0] = 42.0
    assert module.weight[0, 0].item() == 42.0
    x = torch.randn(2, module.in_features)
    bias = module.bias if module.bias is not None else 0
    torch.testing.assert_close(module(x), x @ view.T + bias)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_info(tiny_model, family):
    lm = tiny_model(family)
    heads, kv, hd = EXPECTED_HEADS[family]
    info = lm.heads
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (heads, kv, hd)
    assert info.group_size == heads // kv
    assert head_info(tiny_config(family)) == info


def test_head_info_reads_a_nested_text_config():
    from transformers import Gemma3Config

    text = tiny_config("gemma3")
    outer = Gemma3Config(text_config=text.to_dict())
    info = head_info(outer)
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (HEADS, KV_HEADS, HD)


def test_gemma3_tiny_model_mixes_sliding_and_full_attention(tiny_model):
    lm = tiny_model("gemma3")
    assert set(lm.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = torch.randint(0, lm.config.vocab_size, (1, 20))
    assert torch.isfinite(lm.model(ids).logits).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_facts_are_sane(tiny_model, family):
    lm = tiny_model(family)
    facts = lm.facts()
    prefix, n_layers, linears = EXPECTED[family]
    heads, kv, hd = EXPECTED_HEADS[family]
    per_block = sum(a * b for _, (a, b) in linears.values())
    assert facts["model"] == f"tiny-{family}"
    assert facts["family"] == family
    assert facts["model_type"] == lm.config.model_type
    assert facts["layers"] == n_layers
    assert facts["prunable_parameters"] == per_block * n_layers
    assert facts["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert facts["prunable_parameters"] < facts["parameters"]
    assert (facts["heads"], facts["kv_heads"], facts["head_dim"]) == (heads, kv, hd)
    assert facts["dtype"] == "float32"
    assert facts["device"] == "cpu"
    assert facts["fingerprint"] == lm.fingerprint and len(lm.fingerprint) == 16


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fingerprint_tracks_weights(tiny_model, family):
    lm = tiny_model(family)
    assert fingerprint(lm.model) == lm.fingerprint  # nothing changed
    assert tiny_model(family).fingerprint == lm.fingerprint  # same seed, same weights
    assert tiny_model(family, seed=1).fingerprint != lm.fingerprint

    module = next(iter(lm.prunable().values()))
    view = lm.family.weight_view(module)
    old = view[0, 0].item()
    view[0, 0] = old + 1.0
    changed = fingerprint(lm.model)
    assert changed != lm.fingerprint
    view[0, 0] = old
    assert fingerprint(lm.model) == lm.fingerprint


def test_family_for_config_maps_model_types():
    from transformers import BertConfig, MistralConfig, Qwen2Config

    assert family_for_config(MistralConfig()).name == "llama"
    assert family_for_config(Qwen2Config()).name == "llama"
    assert family_for_config(BertConfig()) is None
    for family in FAMILY_NAMES:
        assert family_for_config(tiny_config(family)).name == family
