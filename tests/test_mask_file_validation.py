"""Mask files are held to their own metadata before anything is applied (issue 19).

A real file is written by save_masks, then one tensor or one metadata entry is changed with
safetensors, and load_masks must refuse it with a MaskFileError naming what differs: a key that
is not mask/, weight/ or bias/; new weights that are not finite floats; a mask bit flipped (the
recorded pruned counts, allocation and achieved sparsity no longer match the bits), padding bits
set; matrices left dense that are not misfits of the file's N:M pattern. Files save_masks writes
for every method and pattern still load. The CLI and the explorer's import say it in one line.

Real tiny models, real files, the real CLI (core.cli.main in-process) and the explorer's handler.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import core.packing
from core.cli import main
from core.dense import DenseWeights
from core.errors import MaskFileError
from core.mask_file import load_masks, save_masks
from core.maskset import dense_note
from core.methods import all_methods
from core.loaded_model import wrap_model
from core.loading import load_model
from core.patterns import Pattern, parse_pattern
from core.pruning import calibrate, cut, prune_sequential
from core.structured.pipeline import prune_structured
from tiny import build_tiny, random_windows, tiny_config

DOWN = "model.layers.0.mlp.down_proj"  # input width 128 in the tiny Llama: fits 64:128
Q = "model.layers.0.self_attn.q_proj"  # input width 64


def _read(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def _rewrite(path, dest, tensors=None, meta=None):
    """`path` rewritten to `dest` with tensors / metadata changed by the given functions."""
    old_meta, old_tensors = _read(path)
    new_tensors = tensors(dict(old_tensors)) if tensors else old_tensors
    new_meta = meta(dict(old_meta)) if meta else old_meta
    save_file({k: v.contiguous() for k, v in new_tensors.items()}, str(dest), metadata=new_meta)
    return dest


def _set(key, value):
    def change(tensors):
        tensors[key] = value
        return tensors
    return change


def _flip(key, row=0, byte=0, bit=0x80):
    def change(tensors):
        t = tensors[key].clone()
        t[row, byte] ^= bit
        tensors[key] = t
        return tensors
    return change


def _drop(*keys):
    def change(meta):
        for key in keys:
            meta.pop(key)
        return meta
    return change


@pytest.fixture(scope="module")
def lm():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def wanda_file(lm, tmp_path_factory):
    """A real unstructured wanda mask file of the tiny Llama."""
    path = tmp_path_factory.mktemp("wanda") / "masks.safetensors"
    return save_masks(path, cut(calibrate(lm, "wanda", random_windows(4, 16)), 0.5, Pattern()), lm)


@pytest.fixture(scope="module")
def sparsegpt_file(lm, tmp_path_factory):
    """A real sparsegpt mask file: masks and new weights."""
    path = tmp_path_factory.mktemp("sgpt") / "masks.safetensors"
    return save_masks(path, cut(calibrate(lm, "sparsegpt", random_windows(4, 16)), 0.5, Pattern()), lm)


@pytest.fixture(scope="module")
def wide_file(lm, tmp_path_factory):
    """A real 64:128 file: 12 of the 14 matrices (width 64) are misfits, left dense."""
    path = tmp_path_factory.mktemp("wide") / "masks.safetensors"
    masks = cut(calibrate(lm, "wanda", random_windows(4, 16)), 0.5, Pattern(64, 128), skip_misfits=True)
    return save_masks(path, masks, lm)


# ---------------------------------------------------------------- what the keys are

@pytest.mark.parametrize("key", ["nokind", f"junk/{Q}", f"masks/{Q}", "mask"])
def test_a_key_of_no_known_kind_is_refused_naming_it(lm, wanda_file, tmp_path, key):
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", tensors=_set(key, torch.randn(64, 64)))
    with pytest.raises(MaskFileError, match=rf"tensor named '{key}'.*mask/, weight/ and bias/"):
        load_masks(bad, lm)


# ---------------------------------------------------------------- new weights and biases

@pytest.mark.parametrize("kind", ["weight", "bias"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_weights_and_biases_must_be_floating_point(lm, sparsegpt_file, tmp_path, kind, dtype):
    shape = (64, 64) if kind == "weight" else (64,)
    bad = _rewrite(sparsegpt_file, tmp_path / "bad.safetensors",
                   tensors=_set(f"{kind}/{Q}", torch.ones(shape).to(dtype)))
    with pytest.raises(MaskFileError, match=rf"{kind}/{Q} is stored as {dtype}.*floating-point"):
        load_masks(bad, lm)


@pytest.mark.parametrize("kind", ["weight", "bias"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_weights_and_biases_must_be_finite(lm, sparsegpt_file, tmp_path, kind, value):
    _, tensors = _read(sparsegpt_file)
    good = tensors[f"weight/{Q}"].clone() if kind == "weight" else torch.zeros(64)
    good.view(-1)[5] = value
    bad = _rewrite(sparsegpt_file, tmp_path / "bad.safetensors", tensors=_set(f"{kind}/{Q}", good))
    with pytest.raises(MaskFileError, match=rf"{kind}/{Q} holds 1 NaN or infinite value"):
        load_masks(bad, lm)


def test_a_finite_float_bias_of_the_right_shape_is_accepted(lm, sparsegpt_file, tmp_path):
    ok = _rewrite(sparsegpt_file, tmp_path / "ok.safetensors", tensors=_set(f"bias/{Q}", torch.randn(64)))
    masks = load_masks(ok, lm)
    assert torch.equal(masks.biases[Q], _read(ok)[1][f"bias/{Q}"]) and Q in masks.weights
    wrong = _rewrite(sparsegpt_file, tmp_path / "wrong.safetensors", tensors=_set(f"weight/{Q}", torch.randn(64, 8)))
    with pytest.raises(MaskFileError, match=r"has shape \(64, 8\) but the model's is \(64, 64\)"):
        load_masks(wrong, lm)


# ---------------------------------------------------------------- the bits against the file's own numbers

def test_a_flipped_mask_bit_is_refused_naming_the_matrix(lm, wanda_file, tmp_path):
    _, tensors = _read(wanda_file)
    pruned = 64 * 64 - core.packing.packed_kept_count(tensors[f"mask/{Q}"])
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", tensors=_flip(f"mask/{Q}"))
    counted = pruned + (1 if tensors[f"mask/{Q}"][0, 0] & 0x80 else -1)
    with pytest.raises(MaskFileError, match=rf"mask of {Q} prunes {counted} of 4096 weights, but the file "
                                            rf"records {pruned}"):
        load_masks(bad, lm)


def test_a_flipped_bit_in_a_file_without_exact_counts_is_refused_by_its_allocation(lm, wanda_file, tmp_path):
    """Files written before `pruned_counts`: the allocation (6 decimals) and achieved sparsity."""
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", tensors=_flip(f"mask/{Q}"),
                   meta=_drop("pruned_counts"))
    with pytest.raises(MaskFileError, match=rf"{Q} is sparsity 0\.50\d+ in the file's masks, but its recorded "
                                            r"allocation says 0\.5"):
        load_masks(bad, lm)
    bad = _rewrite(wanda_file, tmp_path / "bad2.safetensors", tensors=_flip(f"mask/{Q}"),
                   meta=_drop("pruned_counts", "allocation"))
    with pytest.raises(MaskFileError, match=r"its masks prune 0\.\d{6} of the weights, but the file records an "
                                            r"achieved sparsity of '0\.500000'"):
        load_masks(bad, lm)
    # with none of the three, there is nothing to hold the bits to: the file loads as it is
    assert len(load_masks(_rewrite(wanda_file, tmp_path / "old.safetensors", tensors=_flip(f"mask/{Q}"),
                                   meta=_drop("pruned_counts", "allocation", "achieved_sparsity")), lm).masks) == 14


@pytest.mark.parametrize("key, value, match", [
    ("allocation", lambda a: {**a, Q: 0.4}, rf"{Q} is sparsity 0\.500000 .* allocation says 0\.4"),
    ("allocation", lambda a: {k: v for k, v in a.items() if k != Q}, rf"{Q} .* allocation says None"),
    ("allocation", lambda a: {**a, Q: "0.5"}, rf"{Q} .* allocation says '0\.5'"),
    ("allocation", lambda a: {**a, "model.layers.7.mlp.up_proj": 0.5}, r"allocation names 'model\.layers\.7"),
    ("pruned_counts", lambda c: {**c, Q: c[Q] + 1}, rf"mask of {Q} prunes 2048 of 4096 weights, but the file "
                                                   rf"records 2049"),
    ("pruned_counts", lambda c: {**c, Q: 2048.0}, rf"mask of {Q} prunes 2048 .* records 2048\.0"),
])
def test_recorded_numbers_that_differ_from_the_bits_are_refused(lm, wanda_file, tmp_path, key, value, match):
    def change(meta):
        meta[key] = json.dumps(value(json.loads(meta[key])))
        return meta
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", meta=change)
    with pytest.raises(MaskFileError, match=match):
        load_masks(bad, lm)


@pytest.mark.parametrize("key, text", [("achieved_sparsity", "0.400000"), ("achieved_sparsity", "nan"),
                                       ("achieved_sparsity", "half"), ("allocation", "{not json"),
                                       ("pruned_counts", "[1, 2]")])
def test_damaged_metadata_is_refused(lm, wanda_file, tmp_path, key, text):
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", meta=lambda m: {**m, key: text})
    with pytest.raises(MaskFileError, match=f"achieved sparsity of '{text}'" if key == "achieved_sparsity"
                       else f"damaged '{key}' metadata"):
        load_masks(bad, lm)


def _odd_llama():
    """A tiny Llama whose MLP width (100) is not a multiple of 8: packed rows end in padding bits."""
    config = tiny_config("llama")
    config.intermediate_size = 100
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return wrap_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tokenizer=None,
                      model_id="tiny-llama-odd")


def test_padding_bits_of_packed_rows_must_be_zero(tmp_path):
    lm = _odd_llama()
    down = "model.layers.1.mlp.down_proj"  # (64, 100): 13 bytes a row, the last 4 bits padding
    good = save_masks(tmp_path / "m.safetensors", cut(calibrate(lm, "wanda", random_windows(4, 16)), 0.37, Pattern()),
                      lm)
    loaded = load_masks(good, lm)  # what save_masks writes loads, counts right
    assert loaded.pruned_counts()[down] == int(0.37 * 100) * 64
    bad = _rewrite(good, tmp_path / "bad.safetensors", tensors=_flip(f"mask/{down}", row=3, byte=12, bit=0x01))
    with pytest.raises(MaskFileError, match=rf"packed mask of {down} has bits set past the last of its 100 inputs"):
        load_masks(bad, lm)


def test_a_version_1_file_is_held_to_its_allocation_too(lm, wanda_file, tmp_path):
    meta, tensors = _read(wanda_file)
    ms = load_masks(wanda_file, lm)
    v1 = {f"mask/{n}": ms.masks[n].to(torch.uint8) for n in ms.masks}
    meta = {**meta, "format_version": "1"}
    meta.pop("pruned_counts")
    meta.pop("packing")
    save_file(v1, str(tmp_path / "v1.safetensors"), metadata=meta)
    assert load_masks(tmp_path / "v1.safetensors", lm).total_sparsity() == ms.total_sparsity()
    v1[f"mask/{Q}"] = v1[f"mask/{Q}"].clone()
    v1[f"mask/{Q}"][0, 0] ^= 1
    save_file(v1, str(tmp_path / "v1-bad.safetensors"), metadata=meta)
    with pytest.raises(MaskFileError, match=rf"{Q} is sparsity .* allocation says 0\.5"):
        load_masks(tmp_path / "v1-bad.safetensors", lm)
    v1[f"mask/{Q}"][0, 0] = 7
    save_file(v1, str(tmp_path / "v1-junk.safetensors"), metadata=meta)
    with pytest.raises(MaskFileError, match=rf"mask of {Q} holds entries other than 0 and 1"):
        load_masks(tmp_path / "v1-junk.safetensors", lm)


def test_loading_counts_on_the_packed_bits_without_unpacking(lm, wanda_file, monkeypatch):
    monkeypatch.setattr(core.packing, "unpack_mask", lambda *a: pytest.fail("load_masks unpacked a mask"))
    masks = load_masks(wanda_file, lm)
    assert masks.total_sparsity() == 0.5  # counted once, at load: kept, not counted again


# ---------------------------------------------------------------- matrices left dense

def _skip(name, pattern=None):
    """Drop `name`'s mask and record it as left dense (allocation and counts made to agree)."""
    def tensors(t):
        t.pop(f"mask/{name}")
        return t

    def meta(m):
        m["skipped_layers"] = json.dumps(json.loads(m["skipped_layers"]) + [name])
        m["allocation"] = json.dumps({**json.loads(m["allocation"]), name: 0.0})
        counts = json.loads(m["pruned_counts"])
        counts.pop(name, None)
        m["pruned_counts"] = json.dumps(counts)
        m.pop("achieved_sparsity")
        if pattern is not None:
            m["pattern"] = pattern
        return m
    return tensors, meta


def test_an_unstructured_file_cannot_leave_matrices_dense(lm, wanda_file, tmp_path):
    tensors, meta = _skip(Q)
    bad = _rewrite(wanda_file, tmp_path / "bad.safetensors", tensors=tensors, meta=meta)
    with pytest.raises(MaskFileError, match=rf"leaves 1 matrices dense \(e\.g\. {Q}\) as N:M misfits, but its "
                                            r"pattern is 'unstructured'"):
        load_masks(bad, lm)


def test_an_nm_file_leaves_dense_only_the_matrices_it_does_not_fit(lm, wide_file, tmp_path):
    masks = load_masks(wide_file, lm)  # the real file loads: 12 misfits, named as such
    assert len(masks.skipped_layers) == 12 and "(64:128 does not fit their width)" in dense_note(masks)
    tensors, meta = _skip(DOWN)  # width 128: 64:128 fits it
    bad = _rewrite(wide_file, tmp_path / "bad.safetensors", tensors=tensors, meta=meta)
    with pytest.raises(MaskFileError, match=rf"leaves {DOWN} dense as a 64:128 misfit, but its input width 128 is "
                                            r"a multiple of 128"):
        load_masks(bad, lm)


def test_recorded_dense_layers_must_be_the_models_and_unmasked(lm, wide_file, tmp_path):
    def add(name):
        return lambda m: {**m, "skipped_layers": json.dumps(json.loads(m["skipped_layers"]) + [name])}
    bad = _rewrite(wide_file, tmp_path / "bad.safetensors", meta=add("model.layers.9.mlp.up_proj"))
    with pytest.raises(MaskFileError, match=r"records 'model\.layers\.9\.mlp\.up_proj' as left dense, but the "
                                            r"loaded model has no such matrix"):
        load_masks(bad, lm)
    bad = _rewrite(wide_file, tmp_path / "bad2.safetensors", meta=add(DOWN))
    with pytest.raises(MaskFileError, match=rf"records {DOWN} as left dense but also holds a mask for it"):
        load_masks(bad, lm)


# ---------------------------------------------------------------- every file save_masks writes still loads

def _mask_sets(name: str, lm):
    method = all_methods()[name]
    dense = DenseWeights(lm)
    if method.structured:
        masks, _plan = prune_structured(lm, name, random_windows(4, 16), 0.3, dense=dense)
        yield masks
        dense.restore()
        return
    artifact = calibrate(lm, name, random_windows(4, 16), dense=dense)
    for text in ("unstructured", "2:4", "64:128", "3:7"):  # 3:7 fits no matrix: all are left dense
        pattern = parse_pattern(text)
        if not pattern.is_nm or "nm" in method.patterns:
            yield cut(artifact, 0.37, pattern, skip_misfits=True)
    if method.sequential:
        masks, _ = prune_sequential(lm, name, random_windows(4, 16), 0.45, Pattern(), dense=dense, keep_artifact=False)
        yield masks  # saved before the weights are put back (weight-updating methods read them then)
        dense.restore()


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_and_pattern_round_trips(method, tmp_path):
    lm = build_tiny("llama")
    for i, masks in enumerate(_mask_sets(method, lm)):
        path = save_masks(tmp_path / f"{i}.safetensors", masks, lm)
        loaded = load_masks(path, lm)
        assert loaded.total_sparsity() == masks.total_sparsity(), (method, masks.meta.get("pattern"))
        assert loaded.skipped_layers == masks.skipped_layers
    assert i >= 0


# ---------------------------------------------------------------- the CLI and the explorer say it in one line

def test_cli_eval_and_export_refuse_a_bad_file_in_one_line(tiny_llama_dir, tmp_path, capsys):
    lm = load_model(str(tiny_llama_dir))
    good = save_masks(tmp_path / "good.safetensors",
                      cut(calibrate(lm, "sparsegpt", random_windows(4, 16)), 0.5, Pattern()), lm)
    for i, (tensors, what) in enumerate([(_set(f"junk/{Q}", torch.randn(64, 64)), f"junk/{Q}"),
                                         (_set(f"weight/{Q}", torch.ones(64, 64, dtype=torch.int8)), "torch.int8"),
                                         (_flip(f"mask/{Q}"), f"mask of {Q} prunes")]):
        bad = _rewrite(good, tmp_path / f"bad{i}.safetensors", tensors=tensors)
        for args in (["eval", "--masks", bad, "--eval-windows", "1", "--seqlen", "16"],
                     ["export", "--masks", bad, "--out", tmp_path / f"out{i}"]):
            rc = main([str(a) for a in [*args, "--model", tiny_llama_dir]])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert rc == 2 and len(lines) == 1 and what in lines[0], err
            assert "Traceback" not in err
        assert not (tmp_path / f"out{i}").exists()


def test_explorer_import_refuses_a_bad_file_with_a_message(tiny_llama_dir, tmp_path):
    import gradio as gr

    from explorer.state import Session, get_model
    from explorer.tabs.export import on_import

    session = Session(model=get_model(str(tiny_llama_dir)))
    lm = session.model.lm
    good = save_masks(tmp_path / "good.safetensors", cut(calibrate(lm, "wanda", random_windows(4, 16)), 0.5, Pattern()),
                      lm)
    bad = _rewrite(good, tmp_path / "bad.safetensors", tensors=_flip(f"mask/{Q}"))
    with pytest.raises(gr.Error, match=rf"mask of {Q} prunes"):
        on_import(session, str(bad), 0, "q")
    assert len(session.runs) == 0  # nothing added
    on_import(session, str(good), 0, "q")
    assert len(session.runs) == 1
