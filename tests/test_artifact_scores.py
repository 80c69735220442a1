"""Artifacts of score methods keep statistics + ranks, not scores; scores are recomputed one
matrix at a time, cuts are unchanged, and the on-disk form round-trips (old files included)."""
from __future__ import annotations

import ctypes
import os

import pytest
import torch
from safetensors import safe_open

from core.artifacts import load_artifact, save_artifact
from core.calibrate import release_free_memory
from core.cutting import ascending_ranks, cut_unstructured
from core.methods import get_method, all_methods
from core.patterns import Pattern
from core.pruning import calibrate, cut, prune_sequential
from tiny import build_tiny

RECOMPUTED = ("magnitude", "wanda", "ria", "owl")
# the registry's methods whose artifacts recompute scores (RECOMPUTED and any added since)
RECOMPUTING = sorted(name for name, method in all_methods().items() if method.recomputes_scores())
BATCH = 4


def _masks_equal(a, b) -> bool:
    return list(a.masks) == list(b.masks) and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_which_methods_recompute():
    assert all(get_method(m).recomputes_scores() for m in RECOMPUTED)
    # Gamma comes out of mirror descent; SparseGPT solves; both keep what they keep today
    assert not get_method("unipruning").recomputes_scores()
    assert not get_method("sparsegpt").recomputes_scores()


@pytest.mark.parametrize("method", RECOMPUTING)
def test_score_methods_keep_statistics_not_scores(method, windows):
    lm = build_tiny("llama")
    artifact = calibrate(lm, method, windows, batch_size=BATCH)
    m = artifact.method_obj
    assert artifact.recomputes_scores and artifact.scores == {}
    scope = artifact.params.get("scope", m.scope)
    for name in lm.prunable():
        expected = m.score(artifact.dense.weight(name), artifact.stats.get(name), artifact.params)
        got = artifact.score(name)
        assert torch.equal(got, expected), name
        assert torch.equal(artifact.ranks(name, scope), ascending_ranks(expected, scope)), name
    assert artifact.scores == {}  # reading scores does not store them
    if not m.allocates:
        masks = cut(artifact, 0.6)
        for name in lm.prunable():
            assert torch.equal(masks.masks[name], cut_unstructured(artifact.score(name), 0.6, scope)), name


def test_owl_profile_one_block_at_a_time_equals_all_at_once(windows):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "owl", windows, batch_size=BATCH)
    groups = [[artifact.score(n) for n in names] for names in artifact.blocks()]
    assert artifact.block_profile() == artifact.method_obj.block_profile(groups, artifact.params)


@pytest.mark.parametrize("method", RECOMPUTING)
def test_round_trip_without_scores(method, windows, tmp_path):
    lm = build_tiny("llama")
    artifact = calibrate(lm, method, windows, batch_size=BATCH)
    path = save_artifact(tmp_path / f"{method}.safetensors", artifact, lm)
    with safe_open(str(path), framework="pt") as fh:
        assert not [k for k in fh.keys() if k.startswith("score/")]
    again = load_artifact(path, lm, artifact.dense)
    assert again.scores == {} and again.recomputes_scores
    patterns = [(Pattern(), 0.3), (Pattern(), 0.7)]
    if "nm" in artifact.method_obj.patterns:
        patterns.append((Pattern(2, 4), 0.0))
    for pattern, sparsity in patterns:
        assert _masks_equal(cut(artifact, sparsity, pattern), cut(again, sparsity, pattern)), (pattern, sparsity)


def test_version_1_artifacts_are_refused_clearly(windows, tmp_path):
    """Format 1 stored no ranks (every load re-sorted every matrix); such a file is refused with its
    version named and what to do, not misread."""
    from safetensors.torch import save_file

    from core.errors import MaskFileError

    lm = build_tiny("llama")
    artifact = calibrate(lm, "wanda", windows, batch_size=BATCH)
    path = save_artifact(tmp_path / "new.safetensors", artifact, lm)
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith("stats/")}
    meta["format_version"] = "1"
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    with pytest.raises(MaskFileError, match=r"format version 1.*reads version 2.*Calibrate again"):
        load_artifact(old, lm)


def test_loaded_artifact_reads_from_the_file(windows, tmp_path):
    """A loaded artifact memory-maps its file: its ranks are not copies held in memory."""
    lm = build_tiny("llama")
    artifact = calibrate(lm, "unipruning", windows, batch_size=BATCH)
    again = load_artifact(save_artifact(tmp_path / "u.safetensors", artifact, lm), lm, artifact.dense)
    assert again.nbytes() == sum(s.numel() * s.element_size() for st in {id(v): v for v in again.stats.values()}.values()
                                 for s in [*(st.window_x2 or []), st.sum_x2] if s is not None)
    for sparsity in (0.3, 0.6):
        assert _masks_equal(cut(artifact, sparsity), cut(again, sparsity))


def test_stored_score_methods_unchanged(windows):
    lm = build_tiny("llama")
    uni = calibrate(lm, "unipruning", windows, batch_size=BATCH)
    assert set(uni.scores) == set(lm.prunable())
    seq_masks, seq = prune_sequential(lm, "wanda", windows, 0.5, batch_size=BATCH)
    assert set(seq.scores) == set(lm.prunable())  # prune_sequential keeps no statistics: scores stay
    assert _masks_equal(cut(seq, 0.5), seq_masks)
    seq.dense.restore()


def _resident_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return libc


@pytest.mark.skipif(_libc() is None or not os.path.exists("/proc/self/status"), reason="needs glibc and Linux /proc")
def test_release_free_memory_gives_freed_heap_back_to_the_os():
    """Heap blocks freed between live ones stay resident (free() cannot shrink the heap past a live
    block); release_free_memory returns their pages: the resident size drops by most of them."""
    libc = _libc()
    chunk, n = 64 * 1024, 2048  # below glibc's mmap threshold (128 KiB): from the heap, 128 MiB in all
    blocks = [libc.malloc(chunk) for _ in range(n)]
    assert all(blocks)
    for block in blocks:
        libc.memset(block, 1, chunk)  # touched: resident
    freed = blocks[::2]  # every other block: each hole lies between two live blocks
    for block in freed:
        libc.free(block)
    try:
        before = _resident_bytes()
        release_free_memory()
        after = _resident_bytes()
        release_free_memory()  # and again: harmless
    finally:
        for block in blocks[1::2]:
            libc.free(block)
    assert before - after > 0.5 * len(freed) * chunk, (before - after, len(freed) * chunk)


def test_a_loaded_artifact_saves_again_to_a_readable_file(windows, tmp_path):
    """cut --artifact A --save-artifact B: the statistics are written once (safetensors refuses a
    file whose tensors overlap or leave gaps)."""
    from safetensors import safe_open

    lm = build_tiny("llama")
    artifact = calibrate(lm, "sparsegpt", windows, batch_size=BATCH)
    first = load_artifact(save_artifact(tmp_path / "a.safetensors", artifact, lm), lm, artifact.dense)
    again = save_artifact(tmp_path / "b.safetensors", first, lm)
    with safe_open(str(again), framework="pt") as fh:
        keys = list(fh.keys())
    assert len(keys) == len(set(keys)) and any(k.startswith("stats/") for k in keys)
    assert _masks_equal(cut(load_artifact(again, lm, artifact.dense), 0.5), cut(artifact, 0.5))
