"""Masks one bit per weight: pack_mask / unpack_mask (pure functions of tensors), counting the
kept bits without unpacking, and PackedMasks (a read-only mapping of bool masks held packed).

A (d_out, d_in) keep-mask packs to uint8 (d_out, ceil(d_in / 8)) as PACKING says: mask files of
format version 2 and session files store them so.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import torch

# How a mask is packed; written to every mask file so that other readers need not guess.
PACKING = ("rows along d_in, 8 inputs per byte, first input in the most significant bit "
           "(numpy.packbits bitorder='big'), last byte of a row zero-padded")


def packed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The packed tensor's shape for a (d_out, d_in) mask: (d_out, ceil(d_in / 8))."""
    d_out, d_in = shape
    return (d_out, -(-d_in // 8))


# Multiplying 8 bytes that are each 0 or 1, read as one little-endian int64, by this constant
# moves byte i's bit to bit 63 - i; every other partial product lands on a distinct lower bit
# or overflows away, so nothing carries into the top byte. The constant is 0x8040201008040201
# as a signed int64 (torch's int64 multiply wraps).
_GATHER_BITS = 0x8040201008040201 - (1 << 64)
_LITTLE_ENDIAN = sys.byteorder == "little"
# Mask entries handled per step: the int64 intermediates of a whole large matrix would be fresh
# memory pages on every call, whose first touch costs more than the arithmetic.
_STEP_ENTRIES = 1 << 22


def _row_steps(d_out: int, n_bytes: int) -> Iterator[slice]:
    rows = max(1, _STEP_ENTRIES // max(8 * n_bytes, 1))
    return (slice(start, start + rows) for start in range(0, d_out, rows))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) keep-mask as uint8 (d_out, ceil(d_in / 8)), packed as PACKING says."""
    if mask.dim() != 2:
        raise ValueError(f"pack_mask needs a 2-D (d_out, d_in) mask, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask != 0
    d_out, d_in = mask.shape
    out = torch.empty(packed_shape((d_out, d_in)), dtype=torch.uint8, device=mask.device)
    if mask.numel() == 0:
        return out
    bytes_ = mask.contiguous().view(torch.uint8)  # bool is one byte, 0 or 1: no copy
    for rows in _row_steps(d_out, out.shape[1]):
        block = bytes_[rows]
        if d_in % 8:
            block = torch.nn.functional.pad(block, (0, -d_in % 8))
        if not _LITTLE_ENDIAN:
            out[rows] = _pack_shifts(block.view(block.shape[0], -1, 8))
            continue
        if block.storage_offset() % 8:  # an int64 view must start on a whole int64
            block = block.clone()
        gathered = block.view(torch.int64) * _GATHER_BITS
        out[rows] = gathered.bitwise_right_shift_(56)  # the copy keeps the low byte
    return out


def _pack_shifts(groups: torch.Tensor) -> torch.Tensor:
    """pack_mask's bytes from (d_out, n_bytes, 8) uint8 0/1 groups, any byte order (slower)."""
    out = groups[..., 0] << 7
    for i in range(1, 8):
        out |= groups[..., i] << (7 - i)
    return out


def _bit_table() -> torch.Tensor:
    """(256, 8) bool: row b is byte b's bits, most significant first."""
    return ((torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).bool()


# Each byte's 8 bools read as one int64: unpacking is then one gather of 8 bytes per byte.
_UNPACK_TABLE = _bit_table().contiguous().view(torch.int64).squeeze(1)
_POPCOUNT_TABLE = _bit_table().sum(dim=1)
_tables_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpack and popcount tables on `device` (copied there once)."""
    if device.type == "cpu":
        return _UNPACK_TABLE, _POPCOUNT_TABLE
    if device not in _tables_on:
        _tables_on[device] = (_UNPACK_TABLE.to(device), _POPCOUNT_TABLE.to(device))
    return _tables_on[device]


def unpack_mask(packed: torch.Tensor, d_in: int) -> torch.Tensor:
    """The bool (d_out, d_in) mask pack_mask packed; padding bits are ignored."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_mask needs a 2-D uint8 tensor, got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    d_out, n_bytes = packed.shape
    if n_bytes != -(-d_in // 8):
        raise ValueError(f"a packed row of {n_bytes} bytes cannot hold {d_in} inputs "
                         f"(needs {-(-d_in // 8)})")
    unpack, _ = _tables(packed.device)
    out = torch.empty(d_out, d_in, dtype=torch.bool, device=packed.device)
    if out.numel() == 0:
        return out
    for rows in _row_steps(d_out, n_bytes):
        index = packed[rows].reshape(-1).int()
        if d_in == 8 * n_bytes:  # gather straight into the result, seen as int64
            torch.index_select(unpack, 0, index, out=out[rows].view(torch.int64).view(-1))
        else:
            out[rows] = unpack.index_select(0, index).view(torch.bool).view(-1, 8 * n_bytes)[:, :d_in]
    return out


def packed_kept_count(packed: torch.Tensor) -> int:
    """Kept entries (1 bits) of a packed mask, without unpacking: a histogram of its byte values
    weighted by each value's popcount. Padding bits must be 0, as pack_mask leaves them."""
    _, popcount = _tables(packed.device)
    return int(torch.bincount(packed.flatten(), minlength=256).mul_(popcount).sum())


def _clear_padding(packed: torch.Tensor, d_in: int) -> torch.Tensor:
    """`packed` with the bits past d_in in each row's last byte set to 0 (a copy only when
    some are set): counts read every bit, reads never see them."""
    spare = -d_in % 8
    if not spare or packed.numel() == 0:
        return packed
    junk = packed[:, -1] & ((1 << spare) - 1)
    if not bool(junk.any()):
        return packed
    packed = packed.clone()
    packed[:, -1] &= 0xFF ^ ((1 << spare) - 1)
    return packed


class PackedMasks(Mapping):
    """Masks held one bit per weight: a read-only dict of bool masks to every reader.

    A model's masks as bool take a byte per weight (8 GB for 8B parameters); packed they take
    1/8 of that. Each read unpacks a fresh bool mask and keeps nothing unpacked, so only the
    masks in use at a time cost a byte per weight. Shapes, kept counts (hence
    MaskSet.pruned_counts) and save_masks use the packed bits without unpacking.

    Built from bool masks (a dict, LazyMasks, another PackedMasks: packed here), and/or from
    tensors already packed by pack_mask with the masks' (d_out, d_in) shapes (d_in cannot be
    read from a packed row's byte count)."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, *,
                 packed: Mapping[str, torch.Tensor] | None = None,
                 shapes: Mapping[str, tuple[int, int]] | None = None):
        self._packed: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        if isinstance(masks, PackedMasks):  # already packed: share, do not unpack
            self._packed.update(masks._packed)
            self._shapes.update(masks._shapes)
        elif masks is not None:
            for name, mask in masks.items():
                self._packed[name] = pack_mask(mask)
                self._shapes[name] = tuple(mask.shape)
        packed, shapes = dict(packed or {}), dict(shapes or {})
        if set(packed) != set(shapes):
            odd = sorted(set(packed) ^ set(shapes))
            raise ValueError(f"packed masks need a shape each and shapes a packed mask each; "
                             f"unmatched: {', '.join(odd[:5])}")
        for name, tensor in packed.items():
            if name in self._packed:
                raise ValueError(f"{name} is given both as a mask and as a packed mask")
            shape = tuple(int(n) for n in shapes[name])
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != packed_shape(shape):
                raise ValueError(f"{name}: a {shape} mask packs to uint8 {packed_shape(shape)}, "
                                 f"got {tensor.dtype} {tuple(tensor.shape)}")
            self._packed[name] = _clear_padding(tensor, shape[1])
            self._shapes[name] = shape

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name][1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, name) -> bool:
        return name in self._packed

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def packed(self, name: str) -> torch.Tensor:
        """The packed uint8 tensor itself (shared, not a copy: do not modify it)."""
        return self._packed[name]

    def kept_count(self, name: str) -> int:
        """Kept entries of one mask, counted on the packed bits."""
        return packed_kept_count(self._packed[name])

    def nbytes(self) -> int:
        """Bytes the packed masks hold."""
        return sum(t.numel() for t in self._packed.values())

    def __repr__(self) -> str:
        return f"PackedMasks({len(self._packed)} matrices, {self.nbytes()} bytes packed)"

