"""core.run_source: one interface for a run's masks at a setting, one implementation per kind of run
(cut from an artifact, a structured re-prune, fixed masks), and one place that tells structured
masks from others."""
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from core.dense import DenseWeights
from core.patterns import Pattern
from core.pruning import calibrate, cut
from core.run_source import ArtifactCut, FixedMasks, StructuredReprune, is_structured
from tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]


def _weights(lm) -> dict[str, torch.Tensor]:
    return {name: lm.family.weight_view(m).detach().clone() for name, m in lm.prunable().items()}


def test_an_artifact_cut_gives_the_masks_cut_gives_and_says_what_it_can_do(windows_4x32):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "wanda", windows_4x32, batch_size=2)
    source = ArtifactCut(artifact)
    for sparsity, pattern in [(0.3, Pattern()), (0.6, Pattern()), (0.5, Pattern(2, 4))]:
        got, want = source.masks_at(sparsity, pattern), cut(artifact, sparsity, pattern)
        assert set(got.masks) == set(want.masks)
        assert all(torch.equal(got.masks[n], want.masks[n]) for n in want.masks)
    assert source.cheap and source.follows_sparsity and not source.updates_weights and not source.structured
    assert source.artifact is artifact and source.kind == "cut from calibration"
    assert source.same_masks((0.3, "2:4"), (0.7, "2:4"))  # N:M masks do not depend on the sparsity
    assert not source.same_masks((0.3, "unstructured"), (0.7, "unstructured"))
    assert not source.same_masks((0.5, "2:4"), (0.5, "unstructured"))
    assert source.nbytes() == artifact.nbytes() > 0


def test_a_weight_updating_cut_is_not_cheap_and_forgets_its_solves(windows_4x32):
    lm = build_tiny("llama")
    source = ArtifactCut(calibrate(lm, "sparsegpt", windows_4x32, batch_size=2))
    assert source.updates_weights and not source.cheap
    masks = source.masks_at(0.5)
    assert masks.weights  # the re-solved weights come with the masks
    held = source.nbytes()
    source.forget_work()
    assert source.nbytes() < held  # the kept solves are let go


def test_a_structured_reprune_prunes_again_per_sparsity_and_leaves_the_model_dense(windows_4x32):
    lm = build_tiny("llama")
    dense = DenseWeights(lm)
    before = _weights(lm)
    source = StructuredReprune(lm, dense, "wanda-sp", windows_4x32, {}, {"source": "test"})
    assert source.structured and source.follows_sparsity and not source.cheap and source.updates_weights
    light, heavy = source.masks_at(0.2), source.masks_at(0.5)
    assert is_structured(light) and is_structured(heavy)
    assert heavy.total_sparsity() > light.total_sparsity()
    assert source.plan is not None and source.nbytes() == windows_4x32.numel() * windows_4x32.element_size()
    after = _weights(lm)
    assert all(torch.equal(before[n], after[n]) for n in before)  # dense again after each prune
    assert source.same_masks((0.5, "unstructured"), (0.5, "2:4"))  # its pattern is always its own
    assert not source.same_masks((0.5, "structured"), (0.2, "structured"))


def test_the_model_context_is_used_for_every_prune(windows_4x32):
    lm = build_tiny("llama")
    dense = DenseWeights(lm)
    entered = []

    @contextmanager
    def using():
        entered.append(True)
        dense.restore()
        yield lm
        dense.restore()

    source = StructuredReprune(lm, dense, "wanda-sp", windows_4x32, {}, {}, using_model=using)
    source.masks_at(0.3)
    source.masks_at(0.4)
    assert len(entered) == 2


def test_fixed_masks_come_back_as_they_are_at_any_setting(windows_4x32):
    lm = build_tiny("llama")
    masks = cut(calibrate(lm, "magnitude", None), 0.4)
    source = FixedMasks(masks)
    assert source.masks_at(0.9, Pattern(2, 4)) is masks
    assert not source.follows_sparsity and source.same_masks((0.1, "2:4"), (0.9, "unstructured"))
    assert source.kind == "fixed mask" and not source.structured and source.method == "magnitude"


def test_structured_masks_are_told_apart_in_one_place():
    """No module but core/run_source.py compares a mask set's pattern with "structured"."""
    offenders = []
    for path in [*REPO.glob("core/**/*.py"), *REPO.glob("explorer/**/*.py")]:
        if path.name == "run_source.py":
            continue
        text = path.read_text()
        if re.search(r"""get\(["']pattern["']\)\s*[!=]=\s*["']structured["']""", text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
