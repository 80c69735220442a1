"""Run a structured method on a model: validate, prune, apply the plan as masks."""
from __future__ import annotations

import time

import torch

from ..data import check_seqlen
from ..dense import DenseWeights
from ..errors import PatternError
from ..maskset import MaskSet
from ..methods import get_method, all_methods
from ..methods.base import StructuredMethod
from ..loaded_model import LoadedModel
from ..patterns import check_sparsity
from .plan import StructuredPlan
from .units import all_block_units


def prune_structured(lm: LoadedModel, method: str | StructuredMethod, windows: torch.Tensor, sparsity: float,
                     params: dict | None = None, protocol: dict | None = None, dense: DenseWeights | None = None,
                     progress=None, should_stop=None, on_plan=None) -> tuple[MaskSet, StructuredPlan]:
    """Prune `lm` structurally to `sparsity` (fraction of decoder attention + MLP parameters).

    The model is left with the plan applied (dense weights kept in `dense` for restore); on any
    error or cancellation the dense weights come back."""
    method = get_method(method) if isinstance(method, str) else method
    if not getattr(method, "structured", False):
        raise PatternError(f"{method.name} is not a structured method; structured methods: "
                           f"{', '.join(structured_method_names())}.")
    sparsity = check_sparsity(sparsity)
    if windows is not None:
        check_seqlen(lm, windows.shape[-1])  # before any forward pass
    params = method.resolve_params(params)
    dense = dense or DenseWeights(lm)
    start = time.perf_counter()
    dense.note_changed()  # the method writes weights itself (block by block, or a search's candidates)
    try:
        plan = method.prune_structured(lm, windows, sparsity, params, progress, should_stop, on_plan)
        units = all_block_units(lm)
        plan.meta.update({"method": method.name, "params": params, "target_sparsity": f"{sparsity:.6f}",
                          "calibration": {**(protocol or {}), "mode": "structured"},
                          "allocation_structured": plan.allocation(units)})
        mask_set = plan.to_maskset(lm, units)
        dense.restore()
        dense.apply(mask_set)
    except BaseException:
        dense.restore()
        raise
    mask_set.meta["cut_seconds"] = f"{time.perf_counter() - start:.4f}"
    return mask_set, plan


def structured_method_names() -> list[str]:
    return [name for name, m in all_methods().items() if getattr(m, "structured", False)]
