"""What a pruning method is: a name, a typed parameter schema, the statistics it needs, and
either a score function (masks then come from cutting scores) or a solve (it updates weights).

The CLI builds its flags and the explorer its widgets from `params`; nothing else about a
method is hard-coded anywhere. Add a method by adding one file in this package that defines a
subclass decorated with @register.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layer_stats import LayerStats
from ..patterns import Pattern


def _number(value) -> float | int | None:
    """A number from an int, a float or its text ('0.5', '12', ' 1e-3 '); None for anything else
    (bools included: True is not a threshold)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _flag(value) -> bool | None:
    """A bool from a bool, 0/1 or a yes/no word; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return None


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float" | "int" | "bool" | "choice"
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    recalibrate: bool = False  # True: changing it needs a new calibration, not just a new cut

    def range_text(self) -> str:
        """The values a number may take, as messages and help show them."""
        if self.low is not None and self.high is not None:
            return f" in [{self.low}, {self.high}]"
        if self.low is not None:
            return f" of at least {self.low}"
        return f" of at most {self.high}" if self.high is not None else ""

    def coerce(self, value):
        """Check and convert a user value (a widget's, JSON's, or the CLI's text); raise ValueError
        naming the parameter, the value and what fits. Numbers must be finite (NaN and inf never
        fit a range) and within the declared bounds; ints whole; bools a yes/no word or 0/1."""
        given = value
        if self.kind in ("float", "int"):
            number = _number(value)
            whole = self.kind == "float" or (number is not None and math.isfinite(number) and number == int(number))
            if number is None or not math.isfinite(number) or not whole:
                kind = "a finite number" if self.kind == "float" else "a whole number"
                raise ValueError(f"{self.name} must be {kind}{self.range_text()}; got {given!r}.")
            value = float(number) if self.kind == "float" else int(number)
        elif self.kind == "bool":
            value = _flag(value)
            if value is None:
                raise ValueError(f"{self.name} must be true or false; got {given!r}.")
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}; got {value!r}.")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ValueError(f"{self.name} must be in [{self.low}, {self.high}]; got {value}.")
        return value

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "default": self.default, "help": self.help,
                "low": self.low, "high": self.high, "choices": list(self.choices), "recalibrate": self.recalibrate}


class Method:
    name: str = ""
    title: str = ""
    description: str = ""
    patterns: tuple[str, ...] = ("unstructured", "nm")
    params: tuple[Param, ...] = ()
    stats: frozenset = frozenset({"sum_x2"})
    scope: str = "row"  # unstructured comparison group: "row" or "matrix"
    score_label: str = "saliency"  # what the explorer's heatmap calls the scores
    also_rank_by: tuple[str, ...] = ()  # extra rank scopes to compute at calibration (cuts stay fast)
    updates_weights: bool = False
    structured: bool = False  # removes whole heads/channels (StructuredMethod)
    needs_dense_prepass: bool = False  # allocation needs every block's dense scores first (OWL)
    # True/False: whether an artifact recomputes scores from its statistics instead of storing
    # them; None: decided by recomputes_scores() from what the method overrides
    recompute_scores: bool | None = None
    extra_bytes_per_weight: float = 0.0  # what matrix_artifacts keeps per weight besides the score

    def cut_scope(self, params: dict) -> str:
        """The comparison group a cut from this method's artifact ranks within: 'row', 'matrix' or
        'sorted' (cut by counts over sorted scores); a `scope` parameter overrides the class's."""
        return params.get("scope", self.scope)

    def threshold_scope(self, params: dict) -> str:
        """How a cut from this method's artifact thresholds one matrix, for a view of its scores:
        'row' (each row on its own), 'matrix' (one threshold) or 'global' (one budget over all
        matrices sets each matrix's own threshold)."""
        return self.cut_scope(params)

    def recomputes_scores(self) -> bool:
        """Whether an artifact of this method keeps statistics and recomputes scores from them:
        `recompute_scores` where a method sets it, else True for a plain score method (no weight
        update, no own calibration or per-matrix artifacts) whose statistics are vectors (sum_x2,
        sum_x; not X^T X or per-window ones): those scores are cheap to recompute against 4 bytes
        per weight to keep."""
        if self.recompute_scores is not None:
            return self.recompute_scores
        cls = type(self)
        return (not self.updates_weights and not self.structured
                and cls.score is not Method.score
                and cls.matrix_artifacts is Method.matrix_artifacts
                and cls.calibrate_model is Method.calibrate_model
                and frozenset(self.stats) <= {"sum_x2", "sum_x"})

    def resolve_params(self, given: dict | None = None) -> dict:
        given = dict(given or {})
        unknown = set(given) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"{self.name} has no parameter(s) {sorted(unknown)}; it takes "
                             f"{[p.name for p in self.params] or 'none'}.")
        return {p.name: p.coerce(given.get(p.name, p.default)) for p in self.params}

    def score(self, weight: torch.Tensor, stats: LayerStats | None, params: dict) -> torch.Tensor:
        raise NotImplementedError

    sequential: bool = True  # False: masks need every matrix's scores first (a global budget), so
    # "prune" calibrates once on the dense model and cuts, instead of pruning block by block
    allocates: bool = False  # True: per-block sparsities come from block_profile + block_sparsities

    def block_profile(self, block_scores: list[list[torch.Tensor]], params: dict) -> list[float]:
        """What the allocation needs from each block's scores, independent of the target (so an
        artifact computes it once and every cut reuses it)."""
        return [0.0] * len(block_scores)

    def block_sparsities(self, profile: list[float], target: float, params: dict) -> list[float]:
        """Sparsity of each block for an unstructured target; uniform unless a method says otherwise."""
        return [target] * len(profile)

    def matrix_artifacts(self, weight: torch.Tensor, stats: LayerStats | None, params: dict) -> dict[str, torch.Tensor]:
        """What calibration keeps for one matrix: its "score" (drawn as the heatmap, cut by
        default) and any extra tensors a method's own cut needs."""
        return {"score": self.score(weight, stats, params)}

    def calibrate_model(self, lm, windows: torch.Tensor, params: dict, dense, progress=None,
                        should_stop=None) -> dict[str, dict[str, torch.Tensor]] | None:
        """A method's own calibration over the whole model (e.g. with backprop), returning
        matrix_artifacts-style dicts per matrix; None: the layer-wise engine runs instead."""
        return None

    def cut_masks(self, artifact, sparsity: float, pattern: Pattern, names: list[str]) -> dict[str, torch.Tensor] | None:
        """A method's own cut from an artifact (e.g. one global budget); None: the generic cut."""
        return None

    def solve(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "description": self.description,
                "patterns": list(self.patterns), "updates_weights": self.updates_weights,
                "params": [p.as_dict() for p in self.params]}


class StructuredMethod(Method):
    """A method that removes whole attention units and MLP channels (see core.structured).

    It returns a StructuredPlan (kept units per block, refitted weights, compensation biases);
    the pipeline turns it into masks (apply/restore/evaluate as usual) and, on export, into a
    physically smaller model. The sparsity is the fraction of the decoder's attention + MLP
    parameters removed.
    """

    patterns = ("structured",)
    structured = True
    stats = frozenset({"sum_x2", "sum_x"})
    sequential = True

    def prune_structured(self, lm, windows: torch.Tensor, sparsity: float, params: dict,
                         progress=None, should_stop=None, on_plan=None):
        """Decide what to remove and return the StructuredPlan. The method may change the
        model's weights while it runs (sequential methods prune block by block); the pipeline
        (core.structured.pipeline) then sets the model to dense-weights-with-the-plan, or back
        to dense on an error. `progress(done, total, what)`; `should_stop()` -> Cancelled;
        `on_plan(plan, info)` (optional) receives intermediate plans, e.g. a search's best
        candidate so far, so the explorer can draw the allocation while the method runs."""
        raise NotImplementedError
