"""A run's masks at any sparsity and pattern: one interface, one implementation per kind of run.

- `ArtifactCut`: cut from a calibration artifact (ranks compared, or each matrix re-solved for a
  weight-updating method). Every sparsity and pattern the method supports.
- `StructuredReprune`: a structured method's units and refitted weights are solved for one
  sparsity, so each sparsity is pruned again from the run's calibration windows (its pattern is
  always "structured").
- `FixedMasks`: masks read from a file (or a sequential prune's result): every request gives them
  back as they are.

The CLI's prune and sweep, the explorer's runs, its live view, its sweeps and its session file ask
a source; none of them decides again which kind of run it holds. `is_structured` is the one place
that tells structured masks from others.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import torch

from .artifacts import Artifact
from .progress import ProgressFn
from .dense import DenseWeights
from .maskset import MaskSet
from .patterns import Pattern, parse_pattern
from .loaded_model import LoadedModel
from .pruning import cut
from .structured.pipeline import prune_structured
from .structured.plan import StructuredPlan

STRUCTURED = "structured"  # the pattern name structured masks record


def is_structured(masks: MaskSet | None) -> bool:
    """Whether masks remove whole attention units and MLP channels (a structured method's)."""
    return masks is not None and masks.meta.get("pattern") == STRUCTURED


class RunSource:
    """What makes a run's masks. Subclasses say what they can do and give masks at a setting."""

    kind = ""  # in words, for a run list
    structured = False  # whole units removed (sliceable into a smaller model)
    artifact: Artifact | None = None  # the calibration artifact cut from, where there is one
    method = ""

    @property
    def follows_sparsity(self) -> bool:
        """Whether other sparsities give other masks (a fixed mask does not)."""
        return True

    @property
    def cheap(self) -> bool:
        """Whether a new setting is cut in well under a second (ranks compared: no solve, no prune)."""
        return False

    @property
    def updates_weights(self) -> bool:
        """Whether its masks come with new weights (a solve, or a structured refit)."""
        return False

    def same_masks(self, a: tuple[float, str], b: tuple[float, str]) -> bool:
        """Whether the masks at (sparsity, pattern) `a` are those at `b` (nothing to cut again)."""
        return a == b

    def masks_at(self, sparsity: float, pattern: Pattern | None = None, progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None) -> MaskSet:
        raise NotImplementedError

    def forget_work(self) -> None:
        """Drop what was kept to resume or repeat the latest request (a sweep's last point)."""

    def nbytes(self) -> int:
        """Memory this source holds besides the masks it gave."""
        return 0


class ArtifactCut(RunSource):
    """Masks cut from a calibration artifact. skip_misfits: matrices an N:M pattern does not fit
    are left dense (and listed) instead of refused."""

    kind = "cut from calibration"

    def __init__(self, artifact: Artifact, skip_misfits: bool = False):
        self.artifact = artifact
        self.method = artifact.method
        self.skip_misfits = skip_misfits

    @property
    def cheap(self) -> bool:
        return not self.artifact.method_obj.updates_weights

    @property
    def updates_weights(self) -> bool:
        return self.artifact.method_obj.updates_weights

    def same_masks(self, a: tuple[float, str], b: tuple[float, str]) -> bool:
        # N:M masks do not depend on the sparsity
        return a[1] == b[1] and (a[0] == b[0] or parse_pattern(a[1]).is_nm)

    def masks_at(self, sparsity, pattern=None, progress=None, should_stop=None) -> MaskSet:
        return cut(self.artifact, sparsity, pattern or Pattern(), self.skip_misfits, progress, should_stop)

    def forget_work(self) -> None:
        self.artifact.forget_solved()

    def nbytes(self) -> int:
        return self.artifact.nbytes()


@contextmanager
def dense_model(lm: LoadedModel, dense: DenseWeights) -> Iterator[LoadedModel]:
    """The model with its dense weights for the with-block, and dense again after it."""
    dense.restore()
    try:
        yield lm
    finally:
        dense.restore()


class StructuredReprune(RunSource):
    """A structured method pruned again at each sparsity from the same calibration windows.
    `using_model` gives the dense model for one prune (the explorer's takes the model lock); the
    default restores the dense weights before and after."""

    kind = "structured"
    structured = True

    def __init__(self, lm: LoadedModel, dense: DenseWeights, method: str, windows: torch.Tensor, params: dict,
                 protocol: dict, using_model: Callable[[], ContextManager[LoadedModel]] | None = None):
        self.lm, self.dense, self.method = lm, dense, method
        self.windows, self.params, self.protocol = windows, dict(params), dict(protocol)
        self._using_model = using_model or (lambda: dense_model(lm, dense))
        self.plan: StructuredPlan | None = None  # the plan of the latest prune
        self.seconds = 0.0  # how long it took

    @property
    def updates_weights(self) -> bool:
        return True

    def same_masks(self, a, b) -> bool:
        return a[0] == b[0]  # its pattern is always its own

    def masks_at(self, sparsity, pattern=None, progress=None, should_stop=None, on_plan=None) -> MaskSet:
        """on_plan(plan, info): a method's better intermediate plans while it searches (Týr)."""
        with self._using_model() as lm:
            masks, plan = prune_structured(lm, self.method, self.windows, sparsity, self.params, self.protocol,
                                           self.dense, progress, should_stop, on_plan)
        self.plan = plan
        self.seconds = float(masks.meta.get("cut_seconds", 0.0))
        return masks

    def nbytes(self) -> int:
        return self.windows.numel() * self.windows.element_size()


class FixedMasks(RunSource):
    """Masks that stay as they are whatever the setting (a mask file, a sequential prune)."""

    def __init__(self, masks: MaskSet):
        self.masks = masks
        self.method = str(masks.meta.get("method", ""))
        self.structured = is_structured(masks)
        self.kind = "structured (fixed mask)" if self.structured else "fixed mask"

    @property
    def follows_sparsity(self) -> bool:
        return False

    @property
    def updates_weights(self) -> bool:
        return bool(self.masks.weights)

    def same_masks(self, a, b) -> bool:
        return True

    def masks_at(self, sparsity=None, pattern=None, progress=None, should_stop=None) -> MaskSet:
        return self.masks
