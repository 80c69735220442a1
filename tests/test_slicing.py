"""Physically sliced models (core.structured.slicing) on real tiny models of every family.

The reference is the masked model, `DenseWeights(lm).apply(plan.to_maskset(lm))`: the sliced
model must compute the same logits and generate the same ids, hold exactly the plan's
parameters, and survive a save/load round trip (also through core.loading.load_model).
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

from core.export import export_sliced_model
from core.kv_cache import with_cache
from core.dense import DenseWeights
from core.fingerprint import fingerprint
from core.loading import load_model
from core.structured.plan import StructuredPlan
from core.structured.slicing import (STRUCTURE_KEY, EmptyAttention, EmptyMLP, load_sliced, save_sliced,
                                     slice_model)
from core.structured.units import all_block_units, unit_out_columns

ATOL = 1e-4


def _plan(lm, seed: int = 0, empty_block: int | None = None) -> StructuredPlan:
    """Remove some attention units and MLP channels in every block, a different choice per
    block, with perturbed "refitted" weights (o/down and the first MLP input) and random output
    biases on o/down. `empty_block`: remove every unit of that block."""
    family, units = lm.family, all_block_units(lm)
    g = torch.Generator().manual_seed(seed)
    keep_attn, keep_channels, weights, biases = [], [], {}, {}
    modules = lm.prunable()
    for u in units:
        i = u.index
        ka = torch.ones(u.attn_units, dtype=torch.bool)
        ka[i % u.attn_units] = False
        if i % 2 and u.attn_units > 2:
            ka[(i + 2) % u.attn_units] = False
        kc = torch.ones(u.channels, dtype=torch.bool)
        kc[torch.randperm(u.channels, generator=g)[: u.channels * (i + 1) // (len(units) + 3)]] = False
        if i == empty_block:
            ka[:], kc[:] = False, False
        keep_attn.append(ka)
        keep_channels.append(kc)
        prefix = family.block_prefix(i)
        cols = {family.attention.out: unit_out_columns(u, ka), family.mlp.out: kc}
        for rel, col in cols.items():
            w = family.weight_view(modules[f"{prefix}.{rel}"])
            weights[f"{prefix}.{rel}"] = (w + 0.05 * torch.randn(w.shape, generator=g)) * col
            biases[f"{prefix}.{rel}"] = 0.1 * torch.randn(w.shape[0], generator=g)
        up = f"{prefix}.{family.mlp.inputs[0]}"
        w = family.weight_view(modules[up])
        weights[up] = (w + 0.05 * torch.randn(w.shape, generator=g)) * kc.unsqueeze(1)
    return StructuredPlan(keep_attn, keep_channels, weights, biases)


def _added_bias_params(lm, plan) -> int:
    modules = lm.prunable()
    return sum(b.numel() for name, b in plan.biases.items() if getattr(modules[name], "bias", None) is None)


def _ids(seed: int = 1, batch: int = 2, length: int = 14) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _generate(model, ids, new_tokens: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _safetensors_data_bytes(folder) -> int:
    """Bytes of tensor data (file size minus the 8-byte length and the JSON header)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = struct.unpack("<Q", fh.read(8))[0]
        total += file.stat().st_size - 8 - header
    return total


def _masked(lm, plan):
    DenseWeights(lm).apply(plan.to_maskset(lm))
    return lm.model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliced_logits_match_masked(family_name, tiny_model, attn):
    lm = tiny_model(family_name)
    plan = _plan(lm)
    ids = _ids()
    dense_logits = _logits(lm.model, ids)
    before = fingerprint(lm.model)
    sliced = slice_model(lm, plan)
    assert fingerprint(lm.model) == before, "slice_model changed the source model"
    masked = _masked(lm, plan)
    for model in (sliced, masked):
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
    reference = _logits(masked, ids)
    assert (reference - dense_logits).abs().max() > 1e-2, "the plan should change the model"
    torch.testing.assert_close(_logits(sliced, ids), reference, atol=ATOL, rtol=0)
    # slicing the model with the plan applied as masks gives the same model
    torch.testing.assert_close(_logits(slice_model(lm, plan), ids), reference, atol=ATOL, rtol=0)


def test_sliced_shapes_and_parameter_count(family_name, tiny_model):
    lm = tiny_model(family_name)
    plan = _plan(lm)
    units = all_block_units(lm)
    sliced = slice_model(lm, plan)
    removed, added = plan.removed_params(units), _added_bias_params(lm, plan)
    assert removed > 0
    assert _n_params(sliced) == _n_params(lm.model) - removed + added
    structure = getattr(sliced.config, STRUCTURE_KEY)
    family = lm.family
    for u, ka, kc in zip(units, plan.keep_attn, plan.keep_channels):
        block = family.blocks(sliced)[u.index]
        kept = int(ka.sum())
        assert structure["q_heads"][u.index] == kept * u.q_heads_per_unit
        assert structure["kv_heads"][u.index] == kept
        assert structure["intermediate_sizes"][u.index] == int(kc.sum())
        out = family.weight_view(block.get_submodule(family.attention.out))
        assert tuple(out.shape) == (u.hidden, kept * u.q_heads_per_unit * u.head_dim)
        down = family.weight_view(block.get_submodule(family.mlp.out))
        assert tuple(down.shape) == (u.hidden, int(kc.sum()))
    expected_added = sorted(n for n in plan.biases if getattr(lm.prunable()[n], "bias", None) is None)
    assert sorted(structure["added_biases"]) == expected_added


def _cached_steps(model, ids, prefix: int) -> torch.Tensor:
    """Logits of the positions after `prefix`, fed one token at a time through the KV cache
    with no position ids: the model takes positions and mask sizes from the cache's length."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :prefix], **with_cache(model, cache), use_cache=True)
        steps = [model(ids[:, t:t + 1], **with_cache(model, cache), use_cache=True).logits
                 for t in range(prefix, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_matches_masked(family_name, tiny_model, attn):
    lm = tiny_model(family_name)
    plan = _plan(lm, seed=3)
    ids = _ids(seed=4, batch=2, length=10)
    sliced = slice_model(lm, plan)
    masked = _masked(lm, plan)
    for model in (sliced, masked):
        model.set_attn_implementation(attn)
    out = _generate(sliced, ids)
    assert out.shape[1] == ids.shape[1] + 6
    assert torch.equal(out, _generate(masked, ids))


def test_all_removed_attention_and_mlp_in_one_block(family_name, tiny_model):
    lm = tiny_model(family_name)
    plan = _plan(lm, seed=5, empty_block=0)  # block 0: the cache's length is read from layer 0
    family = lm.family
    ids = _ids(seed=6)
    sliced = slice_model(lm, plan)
    block = family.blocks(sliced)[0]
    assert isinstance(block.get_submodule(family.attention.out.rpartition(".")[0]), EmptyAttention)
    mlp_parent = family.mlp.out.rpartition(".")[0]
    if mlp_parent:
        assert isinstance(block.get_submodule(mlp_parent), EmptyMLP)
    else:  # OPT: fc1/fc2 on the layer itself stay, zero channels wide
        assert family.weight_view(block.get_submodule(family.mlp.out)).shape[1] == 0
    structure = getattr(sliced.config, STRUCTURE_KEY)
    assert structure["removed_attention"] == [0] and structure["removed_mlp"] == [0]
    units = all_block_units(lm)
    # the stand-in also drops the attention's non-prunable parameters (Gemma's q_norm/k_norm)
    att_parent = family.attention.out.rpartition(".")[0]
    attn = family.blocks(lm.model)[0].get_submodule(att_parent)
    others = sum(p.numel() for n, p in attn.named_parameters()
                 if f"{att_parent}.{n.rpartition('.')[0]}" not in family.linears)
    assert (family.name == "gemma3") == (others > 0)
    assert _n_params(sliced) == (_n_params(lm.model) - plan.removed_params(units) + _added_bias_params(lm, plan)
                                 - others)
    masked = _masked(lm, plan)
    for impl in ("eager", "sdpa"):
        sliced.set_attn_implementation(impl)
        masked.set_attn_implementation(impl)
        torch.testing.assert_close(_logits(sliced, ids), _logits(masked, ids), atol=ATOL, rtol=0)
        # decoding through the cache: block 0 has no attention, yet its cache layer must count tokens
        full = _logits(sliced, ids)[:, 9:]
        torch.testing.assert_close(_cached_steps(sliced, ids, 9), full, atol=ATOL, rtol=0)
        torch.testing.assert_close(_cached_steps(masked, ids, 9), full, atol=ATOL, rtol=0)
        assert torch.equal(_generate(sliced, ids[:, :9]), _generate(masked, ids[:, :9]))


def test_save_load_round_trip(family_name, tiny_model, tmp_path):
    lm = tiny_model(family_name, with_tokenizer=True)
    plan = _plan(lm, seed=7, empty_block=len(lm.blocks) - 1)
    ids = _ids(seed=8)
    sliced = slice_model(lm, plan)
    expected = _logits(sliced, ids)

    folder = save_sliced(sliced, tmp_path / "sliced")
    config = json.loads((folder / "config.json").read_text())
    assert config[STRUCTURE_KEY] == getattr(sliced.config, STRUCTURE_KEY)
    loaded = load_sliced(folder)
    assert _n_params(loaded) == _n_params(sliced)
    assert torch.equal(_logits(loaded, ids), expected)
    assert torch.equal(_generate(loaded, ids[:1, :8]), _generate(sliced, ids[:1, :8]))

    # slicing the model with the plan already applied (compensation biases set on its modules)
    dense = DenseWeights(lm)
    dense.apply(plan.to_maskset(lm))
    from_masked = save_sliced(slice_model(lm, plan), tmp_path / "from-masked")
    assert torch.equal(_logits(load_sliced(from_masked), ids), expected)
    dense.restore()

    # export (slice + save + PRUNING.json) and the normal loader
    out = export_sliced_model(lm, plan, tmp_path / "export", meta={"note": "test"})
    info = json.loads((out / "PRUNING.json").read_text())
    assert info["source_fingerprint"] == lm.fingerprint and info["sliced"] is True and info["note"] == "test"
    assert info["parameters_sliced"] == _n_params(sliced)
    again = load_model(str(out))
    assert again.family.name == family_name and again.tokenizer is not None
    assert torch.equal(_logits(again.model, ids), expected)


def test_load_refuses_a_mismatched_folder(tiny_model, tmp_path):
    lm = tiny_model("llama")
    folder = save_sliced(slice_model(lm, _plan(lm)), tmp_path / "sliced")
    config = json.loads((folder / "config.json").read_text())
    config[STRUCTURE_KEY]["intermediate_sizes"][0] += 1  # the weights no longer fit the structure
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the sliced structure"):
        load_sliced(folder)
    with pytest.raises(ValueError, match="not a sliced model"):
        lm.model.save_pretrained(tmp_path / "dense")
        load_sliced(tmp_path / "dense")


def test_on_disk_size_shrinks_in_proportion(family_name, tiny_model, tmp_path):
    lm = tiny_model(family_name)
    plan = _plan(lm, seed=9)
    sliced = slice_model(lm, plan)
    lm.model.save_pretrained(tmp_path / "dense")
    save_sliced(sliced, tmp_path / "sliced")
    dense_bytes = _safetensors_data_bytes(tmp_path / "dense")
    sliced_bytes = _safetensors_data_bytes(tmp_path / "sliced")
    removed = plan.removed_params(all_block_units(lm)) - _added_bias_params(lm, plan)
    assert dense_bytes - sliced_bytes == 4 * removed  # fp32: every removed parameter, nothing else
    assert sliced_bytes / dense_bytes == pytest.approx(_n_params(sliced) / _n_params(lm.model), abs=1e-3)
