"""Masks one bit per weight: pack / unpack / popcount, PackedMasks, and mask files of format
version 2 (packed), with version-1 files (a uint8 per weight) still read."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import core.packing
from core.errors import MaskFileError
from core.mask_file import load_masks, save_masks
from core.maskset import MaskSet, allocation_table, mask_shapes
from core.packing import PACKING, PackedMasks, pack_mask, packed_kept_count, packed_shape, unpack_mask
from tiny import build_tiny

T, F = True, False
WIDTHS = [1, 7, 8, 9, 13, 64, 100]


def _random_mask(d_out: int, d_in: int, seed: int = 0, keep: float = 0.5) -> torch.Tensor:
    return torch.rand(d_out, d_in, generator=torch.Generator().manual_seed(seed)) < keep


def _masks_by_kind(d_out: int, d_in: int) -> dict[str, torch.Tensor]:
    return {"random": _random_mask(d_out, d_in, seed=d_in), "sparse": _random_mask(d_out, d_in, d_in + 1, 0.05),
            "all kept": torch.ones(d_out, d_in, dtype=torch.bool),
            "all pruned": torch.zeros(d_out, d_in, dtype=torch.bool)}


@pytest.fixture
def no_unpacking(monkeypatch):
    """Fail the test if anything unpacks a packed mask."""
    def refuse(*args, **kwargs):
        raise AssertionError("a packed mask was unpacked")

    monkeypatch.setattr(core.packing, "unpack_mask", refuse)


# ---------------------------------------------------------------- pack, unpack, count

def test_pack_by_hand_first_input_in_the_most_significant_bit():
    mask = torch.tensor([[T, F, F, F, F, F, F, T, T, F, T],
                         [F, F, F, F, F, F, F, F, F, F, F]])
    assert torch.equal(pack_mask(mask), torch.tensor([[0b10000001, 0b10100000], [0, 0]], dtype=torch.uint8))
    assert torch.equal(unpack_mask(pack_mask(mask), 11), mask)


@pytest.mark.parametrize("d_in", WIDTHS)
@pytest.mark.parametrize("d_out", [1, 5, 32])
def test_pack_unpack_round_trip(d_out, d_in):
    for kind, mask in _masks_by_kind(d_out, d_in).items():
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (d_out, -(-d_in // 8)) == packed_shape(mask.shape)
        # the bit order written in the file's metadata: numpy.packbits' default
        assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1, bitorder="big")), kind
        unpacked = unpack_mask(packed, d_in)
        assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask), kind
        assert packed_kept_count(packed) == int(mask.sum()), kind


@pytest.mark.parametrize("d_in", WIDTHS)
def test_the_any_byte_order_path_packs_the_same(monkeypatch, d_in):
    mask = _random_mask(9, d_in, seed=3)
    fast = pack_mask(mask)
    monkeypatch.setattr(core.packing, "_LITTLE_ENDIAN", False)
    assert torch.equal(pack_mask(mask), fast)


@pytest.mark.parametrize("d_in", [13, 64, 100, 1001])
def test_packing_in_row_steps_gives_the_same_bits(monkeypatch, d_in):
    """Large matrices are packed and unpacked a few rows at a time; force many steps (and one
    row per step) on small masks."""
    mask = _random_mask(37, d_in, seed=5)
    reference = np.packbits(mask.numpy(), axis=1)
    for step in (1, 8 * 64, 8 * 200):
        monkeypatch.setattr(core.packing, "_STEP_ENTRIES", step)
        packed = pack_mask(mask)
        assert np.array_equal(packed.numpy(), reference), step
        assert torch.equal(unpack_mask(packed, d_in), mask), step


def test_pack_accepts_views_and_0_1_tensors():
    big = _random_mask(10, 40, seed=4)
    for view in (big[1:], big[:, 3:16], big.t(), big[2:7, 8:32]):
        assert torch.equal(unpack_mask(pack_mask(view), view.shape[1]), view)
    assert torch.equal(pack_mask(big.to(torch.uint8)), pack_mask(big))
    assert tuple(pack_mask(torch.ones(0, 5, dtype=torch.bool)).shape) == (0, 1)
    assert tuple(unpack_mask(torch.zeros(3, 0, dtype=torch.uint8), 0).shape) == (3, 0)


def test_pack_and_unpack_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="2-D"):
        pack_mask(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot hold 17 inputs"):
        unpack_mask(torch.zeros(2, 2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(torch.zeros(2, 2, dtype=torch.int32), 16)


def test_popcount_by_hand():
    assert packed_kept_count(torch.tensor([[0xFF, 0x00, 0x81], [0x01, 0x7F, 0x10]], dtype=torch.uint8)) == 19
    every_byte = torch.arange(256, dtype=torch.uint8).view(32, 8)
    assert packed_kept_count(every_byte) == 256 * 8 // 2


# ---------------------------------------------------------------- PackedMasks

def _bool_masks() -> dict[str, torch.Tensor]:
    return {f"m{d_in}": _random_mask(6, d_in, seed=d_in) for d_in in WIDTHS}


def test_packed_masks_read_like_a_dict_and_hold_an_eighth():
    masks = _bool_masks()
    packed = PackedMasks(masks)
    assert list(packed) == list(masks) and len(packed) == len(masks)
    assert "m13" in packed and "nope" not in packed and packed.get("nope") is None
    with pytest.raises(KeyError):
        packed["nope"]
    for name, mask in masks.items():
        assert torch.equal(packed[name], mask) and packed[name].dtype == torch.bool
        assert packed[name] is not packed[name]  # unpacked on each read, nothing kept
        assert torch.equal(packed.packed(name), pack_mask(mask))
        assert packed.kept_count(name) == int(mask.sum())
    assert packed.shapes() == {n: tuple(m.shape) for n, m in masks.items()} == mask_shapes(packed)
    assert packed.nbytes() == sum(6 * -(-d_in // 8) for d_in in WIDTHS)
    with pytest.raises(TypeError):
        packed["m8"] = masks["m8"]  # read-only
    assert "7 matrices" in repr(packed)


def test_packed_masks_from_packed_tensors_and_from_each_other(no_unpacking):
    masks = _bool_masks()
    ready = {n: pack_mask(m) for n, m in masks.items()}
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    one = PackedMasks(packed=ready, shapes=shapes)
    assert one.shapes() == shapes and all(one.packed(n) is ready[n] for n in ready)  # not copied
    again = PackedMasks(one)
    assert all(again.packed(n) is ready[n] for n in ready)
    both = PackedMasks({"extra": torch.ones(2, 3, dtype=torch.bool)}, packed=ready, shapes=shapes)
    assert set(both) == {"extra", *ready}


def test_packed_masks_refuse_mismatched_tensors():
    ready = {"a": pack_mask(_random_mask(4, 13))}
    with pytest.raises(ValueError, match="unmatched: a"):
        PackedMasks(packed=ready)
    with pytest.raises(ValueError, match=r"a \(4, 20\) mask packs to uint8 \(4, 3\)"):
        PackedMasks(packed=ready, shapes={"a": (4, 20)})
    with pytest.raises(ValueError, match="uint8"):
        PackedMasks(packed={"a": ready["a"].int()}, shapes={"a": (4, 13)})
    with pytest.raises(ValueError, match="both"):
        PackedMasks({"a": torch.ones(4, 13, dtype=torch.bool)}, packed=ready, shapes={"a": (4, 13)})


def test_padding_bits_set_elsewhere_are_cleared_not_counted():
    mask = _random_mask(5, 13)
    dirty = pack_mask(mask)
    dirty[:, -1] |= 0b00000111  # the 3 bits past input 13
    held = PackedMasks(packed={"a": dirty}, shapes={"a": (5, 13)})
    assert held.kept_count("a") == int(mask.sum())
    assert torch.equal(held["a"], mask)
    assert int(dirty[0, -1]) & 0b111 == 0b111  # the caller's tensor is left as it was


def test_pruned_counts_of_packed_masks_unpack_nothing(no_unpacking):
    masks = _bool_masks()
    expected = {n: m.numel() - int(m.count_nonzero()) for n, m in masks.items()}
    ms = MaskSet(PackedMasks(masks), dense_layers={"dense one": (4, 4)})
    assert ms.pruned_counts() == expected
    assert ms.shapes() == {n: tuple(m.shape) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values()) + 16
    assert ms.total_sparsity() == pytest.approx(sum(expected.values()) / total)
    assert ms.sparsity_per_matrix()["m13"] == pytest.approx(expected["m13"] / masks["m13"].numel())


def test_allocation_table_of_packed_masks_unpacks_nothing(llama, no_unpacking):
    masks = _model_masks(llama)
    rows = allocation_table(MaskSet(PackedMasks(masks)), llama)
    assert rows == allocation_table(MaskSet(dict(masks)), llama)
    assert [(r["name"], r["pruned"]) for r in rows] == [(n, m.numel() - int(m.sum())) for n, m in masks.items()]


# ---------------------------------------------------------------- files

@pytest.fixture
def llama():
    return build_tiny("llama")


def _model_masks(lm, seed: int = 3) -> dict[str, torch.Tensor]:
    return {name: _random_mask(*lm.family.weight_view(m).shape, seed=seed + i, keep=0.7)
            for i, (name, m) in enumerate(lm.prunable().items())}


def _file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {key: fh.get_tensor(key) for key in fh.keys()}


def test_save_writes_packed_masks_and_load_gives_them_back(llama, tmp_path):
    masks = _model_masks(llama)
    one = next(iter(masks))
    weights = {one: torch.randn(masks[one].shape)}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, weights=weights, meta={"method": "wanda"}), llama)
    meta, tensors = _file(path)
    assert meta["format_version"] == "2" and meta["packing"] == PACKING
    for name, mask in masks.items():
        stored = tensors[f"mask/{name}"]
        assert stored.dtype == torch.uint8 and tuple(stored.shape) == packed_shape(mask.shape), name
    loaded = load_masks(path, llama)
    assert isinstance(loaded.masks, PackedMasks)
    assert set(loaded.masks) == set(masks)  # file order (sorted names), as before packing
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask), name
    assert torch.equal(loaded.weights[one], weights[one])
    assert loaded.meta["method"] == "wanda"
    assert loaded.pruned_counts() == {n: m.numel() - int(m.sum()) for n, m in masks.items()}
    assert loaded.masks.nbytes() == sum(t.numel() for k, t in tensors.items() if k.startswith("mask/"))


def test_saving_packed_masks_writes_the_same_file_without_unpacking(llama, tmp_path, monkeypatch):
    masks = _model_masks(llama)
    meta = {"method": "magnitude", "params": {"x": 1}}
    plain = save_masks(tmp_path / "plain.safetensors", MaskSet(masks, meta=meta), llama)
    packed_set = MaskSet(PackedMasks(masks), meta=meta)
    monkeypatch.setattr(core.packing, "unpack_mask", lambda *a: pytest.fail("save unpacked a mask"))
    packed = save_masks(tmp_path / "packed.safetensors", packed_set, llama)
    monkeypatch.undo()
    # safetensors writes metadata keys in hash order, so compare contents, not bytes
    (meta_a, tensors_a), (meta_b, tensors_b) = _file(plain), _file(packed)
    assert meta_a == meta_b
    assert list(tensors_a) == list(tensors_b)
    for key, tensor in tensors_a.items():
        assert tensor.dtype == tensors_b[key].dtype and torch.equal(tensor, tensors_b[key]), key
    assert plain.stat().st_size == packed.stat().st_size


def _write_version_1(path, lm, masks: dict[str, torch.Tensor], weights=None, meta=None) -> None:
    """A mask file exactly as save_masks wrote it before packing (format version 1)."""
    tensors = {f"mask/{name}": mask.to(torch.uint8).contiguous() for name, mask in masks.items()}
    tensors.update({f"weight/{name}": w.contiguous() for name, w in (weights or {}).items()})
    ms = MaskSet(dict(masks))
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (meta or {}).items()}
    metadata.update({
        "format": "pruning-explorer-masks",
        "format_version": "1",
        "model_id": lm.model_id,
        "model_fingerprint": lm.fingerprint,
        "model_type": lm.config.model_type,
        "layout": "canonical (d_out, d_in), True/1 = keep",
        "achieved_sparsity": f"{ms.total_sparsity():.6f}",
        "allocation": json.dumps({n: round(s, 6) for n, s in ms.sparsity_per_matrix().items()}),
        "skipped_layers": json.dumps([]),
    })
    save_file(tensors, str(path), metadata=metadata)


def test_version_1_files_still_load(llama, tmp_path):
    masks = _model_masks(llama, seed=11)
    one = next(iter(masks))
    weights = {one: torch.randn(masks[one].shape)}
    old = tmp_path / "v1.safetensors"
    _write_version_1(old, llama, masks, weights, meta={"method": "wanda"})
    loaded = load_masks(old, llama)
    assert isinstance(loaded.masks, PackedMasks)
    assert set(loaded.masks) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask), name
    assert torch.equal(loaded.weights[one], weights[one])
    assert loaded.meta["format_version"] == "1" and loaded.meta["method"] == "wanda"
    # re-saving a version-1 mask set writes version 2, with the same masks
    again = load_masks(save_masks(tmp_path / "v2.safetensors", loaded, llama), llama)
    assert again.meta["format_version"] == "2" and again.meta["packing"] == PACKING
    assert all(torch.equal(again.masks[n], m) for n, m in masks.items())


def test_version_1_checks_shapes_as_before(llama, tmp_path):
    name = "model.layers.0.mlp.up_proj"
    masks = _model_masks(llama)
    masks[name] = torch.ones(3, 3, dtype=torch.bool)
    old = tmp_path / "v1.safetensors"
    _write_version_1(old, llama, masks)
    with pytest.raises(MaskFileError, match=r"up_proj has shape \(3, 3\) but the model's is \(128, 64\)"):
        load_masks(old, llama)


def test_packed_file_is_an_eighth_of_the_old_one(llama, tmp_path):
    masks = _model_masks(llama)
    old = tmp_path / "v1.safetensors"
    _write_version_1(old, llama, masks)
    new = save_masks(tmp_path / "v2.safetensors", MaskSet(masks), llama)
    old_bytes = sum(t.numel() for t in _file(old)[1].values())
    new_bytes = sum(t.numel() * t.element_size() for t in _file(new)[1].values())
    rows = sum(m.shape[0] for m in masks.values())
    assert old_bytes == sum(m.numel() for m in masks.values())
    assert new_bytes <= old_bytes / 8 + rows  # at most one byte of padding per row
    assert new.stat().st_size < old.stat().st_size / 4  # the header is the same size in both
    # widths that are not multiples of 8 pad each row's last byte, no more
    odd = PackedMasks(_bool_masks())
    assert odd.nbytes() <= sum(math.prod(s) for s in odd.shapes().values()) / 8 + 6 * len(odd)


@pytest.mark.parametrize("version, named", [("3", "mask format version 3"), (None, "no mask format version")])
def test_other_format_versions_are_refused_with_what_to_do(llama, tmp_path, version, named):
    masks = _model_masks(llama)
    path = tmp_path / "m.safetensors"
    meta = {"format": "pruning-explorer-masks", "model_fingerprint": llama.fingerprint}
    if version is not None:
        meta["format_version"] = version
    save_file({f"mask/{n}": pack_mask(m) for n, m in masks.items()}, str(path), metadata=meta)
    with pytest.raises(MaskFileError) as info:
        load_masks(path, llama)
    message = str(info.value)
    assert named in message and "reads versions 1 and 2" in message and "export the masks again" in message


def test_version_2_refuses_unpacked_or_foreign_masks(llama, tmp_path):
    name = "model.layers.0.mlp.up_proj"
    masks = _model_masks(llama)
    good = save_masks(tmp_path / "good.safetensors", MaskSet(masks), llama)
    meta, tensors = _file(good)

    unpacked = dict(tensors, **{f"mask/{name}": masks[name].to(torch.uint8)})  # version-1 layout, version-2 label
    save_file(unpacked, str(tmp_path / "unpacked.safetensors"), metadata=meta)
    with pytest.raises(MaskFileError, match=r"up_proj has a packed mask of shape \(128, 64\) but the model's "
                                            r"\(128, 64\) matrix packs to \(128, 8\)"):
        load_masks(tmp_path / "unpacked.safetensors", llama)

    as_bool = dict(tensors, **{f"mask/{name}": tensors[f"mask/{name}"].bool()})
    save_file(as_bool, str(tmp_path / "bool.safetensors"), metadata=meta)
    with pytest.raises(MaskFileError, match="stored as torch.bool, not as packed uint8"):
        load_masks(tmp_path / "bool.safetensors", llama)

    save_file(tensors, str(tmp_path / "lsb.safetensors"), metadata=dict(meta, packing="lsb first"))
    with pytest.raises(MaskFileError, match="packed as 'lsb first'"):
        load_masks(tmp_path / "lsb.safetensors", llama)


def test_version_2_keeps_the_other_checks(llama, tmp_path):
    masks = _model_masks(llama)
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks), llama)
    with pytest.raises(MaskFileError, match="was made for model 'tiny-llama'"):
        load_masks(path, build_tiny("llama", seed=1))
    partial = dict(masks)
    gone = partial.pop("model.layers.1.self_attn.q_proj")
    assert gone is not None
    with pytest.raises(MaskFileError, match=r"no mask for 1 of the model's .*q_proj.*export the masks again"):
        load_masks(save_masks(tmp_path / "partial.safetensors", MaskSet(partial), llama), llama)
    skipped = load_masks(save_masks(tmp_path / "skipped.safetensors",
                                    MaskSet(partial, dense_layers={"model.layers.1.self_attn.q_proj": (64, 64)}),
                                    llama), llama)
    assert skipped.skipped_layers == ["model.layers.1.self_attn.q_proj"]
