"""Calibration artifacts: calibrate once (minutes), cut any sparsity later (seconds), in another
session or on another day.

An `Artifact` keeps, per prunable matrix, what a cut needs: the ranks of its scores (so an
unstructured cut is one comparison), the scores themselves where they cannot be recomputed
cheaply from the dense weight and small input statistics (Wanda, RIA, OWL and magnitude keep the
statistics instead, see `Method.recomputes_scores`), sorted scores for methods that cut by counts, a
method's extra tensors (UniPruning's first-activation step) and, for weight-updating methods, the
input statistics. The per-weight tensors live in a tensor store (core.tensor_store): in memory for
small models, spilled to disk while a big model is calibrated, memory-mapped from a saved file.

On disk: one safetensors file (format version 2) holding those tensors, the ranks and sorted
scores included, and string metadata (method, parameters, protocol, model, the block profile),
so loading reads the header only and a cut reads only what it needs.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from .layer_stats import LayerStats
from .cutting import ascending_ranks
from .dense import DenseWeights
from .errors import MaskFileError
from .fingerprint import mismatch, written_with
from .fit import available_memory_bytes
from .loaded_model import LoadedModel
from .methods import Method, get_method
from .outputs import cache_dir, atomic_write
from .tensor_store import FileStore, MemoryStore, SpillStore, write_safetensors, read_header

ARTIFACT_FORMAT = "pruning-explorer-artifact"
ARTIFACT_VERSION = "2"
_STAT_FIELDS = ("sum_x2", "sum_x", "xtx")


def block_names(lm: LoadedModel) -> dict[str, int]:
    """Prunable matrix name -> its block index."""
    prefix = lm.family.blocks_path + "."
    return {name: int(name[len(prefix):].split(".", 1)[0]) for name in lm.prunable()}


class _Prefixed(Mapping):
    """A read-only view of a store's keys under one prefix (artifact.scores, artifact.extras)."""

    def __init__(self, artifact: "Artifact", prefix: str, nested: bool = False):
        self._artifact, self._prefix, self._nested = artifact, prefix, nested

    def _names(self) -> list[str]:
        names = []
        for key in self._artifact.stored_keys():
            if key.startswith(self._prefix):
                rest = key[len(self._prefix):]
                name = rest.split("/", 1)[1] if self._nested else rest
                if name not in names:
                    names.append(name)
        return names

    def __getitem__(self, name: str):
        if self._nested:
            kinds = {key[len(self._prefix):].split("/", 1)[0] for key in self._artifact.stored_keys()
                     if key.startswith(self._prefix) and key.endswith("/" + name)}
            if not kinds:
                raise KeyError(name)
            return {kind: self._artifact.stored(f"{self._prefix}{kind}/{name}") for kind in kinds}
        tensor = self._artifact.stored(self._prefix + name)
        if tensor is None:
            raise KeyError(name)
        return tensor

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class Artifact:
    """Everything a cut needs, per prunable matrix, from one calibration."""

    def __init__(self, method: str, params: dict, protocol: dict, fingerprint: str, dense: DenseWeights,
                 block_of: dict[str, int], calibration_seconds: float = 0.0, store=None, base: FileStore | None = None):
        self.method = method
        self.params = params
        self.protocol = protocol
        self.fingerprint = fingerprint
        self.dense = dense
        self.block_of = block_of
        self._calibration_seconds = calibration_seconds
        self._stats: dict[str, LayerStats] = {}
        self._store = store if store is not None else MemoryStore()  # what this session adds
        self._base = base  # a loaded artifact file (read-only)
        self._profile: list[float] | None = None
        # N:M masks do not depend on the sparsity: the last N:M settings' masks are kept, so moving
        # the slider (or switching back) at N:M costs nothing after the first cut.
        self._nm = _SettingsCache()
        # Weight-updating methods: {matrix: (weight, mask)} of the latest cut's solves, kept as they
        # finish, so a cut cancelled half way is resumed by the next at the same settings.
        self._solved = _SettingsCache()

    # ---------------------------------------------------------------- what the calibration recorded

    @property
    def calibration_seconds(self) -> float:
        return self._calibration_seconds

    def record_calibration_time(self, seconds: float) -> None:
        self._calibration_seconds = float(seconds)

    @property
    def stats(self) -> Mapping[str, LayerStats]:
        """Input statistics per matrix (read-only: set_stats adds them)."""
        return MappingProxyType(self._stats)

    def set_stats(self, name: str, stats: LayerStats) -> None:
        self._stats[name] = stats

    def update_cut_params(self, values: dict) -> None:
        """New values of parameters that only change the cut (core.pruning.update_cut_params decides
        which); the allocation inputs, which may depend on them, are computed again."""
        self.params.update(values)
        self._profile = None

    # ---------------------------------------------------------------- tensors in the stores

    def stored(self, key: str, random_access: bool = False) -> torch.Tensor | None:
        """One stored tensor by its file key ("rank/row/<matrix>", "score/<matrix>", ...): what this
        session added, else the loaded file's; None if neither holds it."""
        found = self._store.get(key)
        if found is None and self._base is not None:
            found = self._base.get(key, random_access)
        return found

    def stored_keys(self) -> list[str]:
        """Every stored tensor's key (this session's first, then the loaded file's others)."""
        keys = list(self._store.keys())
        if self._base is not None:
            seen = set(keys)
            keys += [k for k in self._base.keys() if k not in seen]
        return keys

    @property
    def scores(self) -> Mapping:
        """Stored scores per matrix (read-only; recomputable scores are not stored)."""
        return _Prefixed(self, "score/")

    @property
    def extras(self) -> Mapping:
        """Per matrix, the method's extra tensors by kind (e.g. {'first_step': ...})."""
        return _Prefixed(self, "extra/", nested=True)

    def set_extras(self, name: str, extras: dict[str, torch.Tensor]) -> None:
        for kind, tensor in extras.items():
            self._store.put(f"extra/{kind}/{name}", tensor)

    @property
    def method_obj(self) -> Method:
        return get_method(self.method)

    @property
    def recomputes_scores(self) -> bool:
        """Whether this artifact keeps small per-matrix statistics instead of scores (see the
        module function). Unstructured cuts never need scores: they compare ranks."""
        return self.method_obj.recomputes_scores()

    def _can_recompute(self, name: str) -> bool:
        return self.recomputes_scores and (name in self.stats or not self.method_obj.stats)

    def score(self, name: str) -> torch.Tensor:
        """Scores of one matrix: stored ones, else computed now from the dense weight and the
        statistics. Recomputable scores are not kept (reading every matrix's scores one after
        another never holds more than one matrix's); others (e.g. SparseGPT's drawing saliency) are
        kept once computed."""
        stored = self.stored(f"score/{name}")
        if stored is not None:
            return stored
        scores = self.method_obj.score(self.dense.weight(name), self.stats.get(name), self.params)
        if not self._can_recompute(name):
            self._store.put(f"score/{name}", scores)
        return scores

    def set_scores(self, name: str, scores: torch.Tensor, scope: str, stats: LayerStats | None = None) -> None:
        """Rank a matrix's scores now, during calibration, so that every later unstructured cut is
        one comparison. The scores are kept only when they cannot be recomputed from `stats` (kept
        instead) and the dense weight."""
        if stats is not None:
            self._stats[name] = stats
        if not self._can_recompute(name):
            self._store.put(f"score/{name}", scores)
        if scope == "sorted":  # the method cuts by counts over sorted scores, not by ranks
            self._store.put(f"sorted/{name}", scores.reshape(-1).sort().values)
        else:
            self._store.put(f"rank/{scope}/{name}", ascending_ranks(scores, scope))
        for extra in self.method_obj.also_rank_by:
            self._store.put(f"rank/{extra}/{name}", ascending_ranks(scores, extra))

    def sorted_scores(self, name: str) -> torch.Tensor:
        """A matrix's scores sorted ascending, flat (for cuts by count, e.g. a global budget)."""
        found = self.stored(f"sorted/{name}", random_access=True)  # read by bisection: a few entries
        if found is None:
            found = self.score(name).reshape(-1).sort().values
            self._store.put(f"sorted/{name}", found)
        return found

    def ranks(self, name: str, scope: str) -> torch.Tensor:
        found = self.stored(f"rank/{scope}/{name}")
        if found is None:
            found = ascending_ranks(self.score(name), scope)
            self._store.put(f"rank/{scope}/{name}", found)
        return found

    # ---------------------------------------------------------------- allocation and caches

    def block_profile(self) -> list[float]:
        """The method's per-block allocation inputs (e.g. OWL outlier ratios), computed once."""
        if self._profile is None:
            method = self.method_obj
            if self.recomputes_scores:  # one block's scores at a time: a profile entry is its block's
                self._profile = [method.block_profile([[self.score(n) for n in names]], self.params)[0]
                                 for names in self.blocks()]
            else:
                groups = [[self.score(n) for n in names] for names in self.blocks()]
                self._profile = method.block_profile(groups, self.params)
        return self._profile

    def set_profile(self, profile: list[float]) -> None:
        """Allocation inputs computed before (stored in an artifact file with the parameters they
        were computed under)."""
        self._profile = list(profile)

    def nm_masks(self, key: tuple) -> "NmMasks":
        """The masks cuts at these N:M settings made so far (a new, empty record for new settings:
        those of other settings are dropped)."""
        return self._nm.get(key, NmMasks)

    def solved(self, key: tuple) -> dict:
        """The weight-updating cut's solves at these settings so far (a dict the cut fills)."""
        return self._solved.get(key, dict)

    def forget_solved(self) -> None:
        """Drop the weight-updating cut's kept solves (a sweep's last point; masks already made keep
        their own references)."""
        self._solved.clear()

    def nbytes(self) -> int:
        """Memory held by the artifact's own tensors (scores, ranks, sorted scores, extras in the
        memory store, statistics counted once each), not what is spilled or memory-mapped, nor the
        dense weights it shares with the model."""
        seen, total = set(), self._store.nbytes()
        for stats in self.stats.values():
            if id(stats) in seen:
                continue
            seen.add(id(stats))
            for value in vars(stats).values():
                tensors = value if isinstance(value, list) else [value]
                total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        solved = self._solved.current()
        if solved is not None:
            total += sum(w.numel() * w.element_size() + m.numel() for w, m in solved.values())
        return total

    def blocks(self) -> list[list[str]]:
        n = max(self.block_of.values()) + 1
        out = [[] for _ in range(n)]
        for name, b in self.block_of.items():
            out[b].append(name)
        return out


class _SettingsCache:
    """One value kept for the latest settings key: asking with another key starts a new one."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, key: tuple, new):
        if self._value is None or self._key != key:
            self._key, self._value = key, new()
        return self._value

    def current(self):
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None


class NmMasks:
    """What cuts at one N:M setting made: `own`, a method's own cut (all its masks), or `made`, the
    masks a generic (lazy) cut has made so far, filled as readers ask for them."""

    def __init__(self):
        self.own: Mapping[str, torch.Tensor] | None = None
        self.made: dict[str, torch.Tensor] = {}


# ---------------------------------------------------------------- where a new artifact's tensors go

def rank_bytes(scope: str, d_out: int, d_in: int) -> int:
    """Bytes of one matrix's ranks within `scope` (core.cutting.ascending_ranks: int16 while a
    comparison group holds fewer than 2^15 entries, else int32)."""
    group = d_in if scope == "row" else d_out * d_in
    return d_out * d_in * (2 if group < 2**15 else 4)


def artifact_bytes(method: Method, params: dict, d_out: int, d_in: int) -> int:
    """What an artifact of `method` keeps for one (d_out, d_in) matrix: its scores unless they are
    recomputed from statistics, its ranks (or sorted scores), extra rank scopes and extras. A
    weight-updating or structured method keeps no per-weight artifact."""
    if method.updates_weights or method.structured:
        return 0
    numel = d_out * d_in
    scope = method.cut_scope(params)
    total = 0 if method.recomputes_scores() else 4 * numel
    total += 4 * numel if scope == "sorted" else rank_bytes(scope, d_out, d_in)
    total += sum(rank_bytes(extra, d_out, d_in) for extra in method.also_rank_by)
    return total + int(method.extra_bytes_per_weight * numel)


def artifact_spills(nbytes: float) -> bool:
    """Whether an artifact of this many bytes is spilled to disk while it is made: above 2 GiB or a
    quarter of the available memory (the explorer keeps small models' artifacts in memory, where a
    cut reads them fastest). PRUNE_EXPLORER_ARTIFACT_STORE=memory|disk overrides."""
    import os

    choice = os.environ.get("PRUNE_EXPLORER_ARTIFACT_STORE", "").strip().lower()
    if choice in ("memory", "disk"):
        return choice == "disk"
    available = available_memory_bytes() or 2**34
    return nbytes > min(2**31, available / 4)


def new_store(lm: LoadedModel, method: Method, params: dict):
    """The store a new artifact's per-weight tensors go to (see artifact_spills)."""
    shapes = [lm.family.weight_view(m).shape for m in lm.prunable().values()]
    if artifact_spills(sum(artifact_bytes(method, params, d_out, d_in) for d_out, d_in in shapes)):
        return SpillStore(cache_dir() / "artifact-spill")
    return MemoryStore()


# ---------------------------------------------------------------- files

def _entries(artifact: Artifact):
    """(key, reader, dtype, shape) of every tensor an artifact file holds, in a stable order."""
    out = []
    for key in artifact.stored_keys():
        if key.startswith("stats/"):  # a loaded artifact's statistics: written once, from artifact.stats
            continue
        tensor = artifact.stored(key)
        out.append((key, lambda key=key: artifact.stored(key), tensor.dtype, tuple(tensor.shape)))
    owner_of, n_tokens, alias = {}, {}, {}
    for name, stats in artifact.stats.items():
        if id(stats) in owner_of:  # modules fed one input share one LayerStats: store it once
            alias[name] = owner_of[id(stats)]
            continue
        owner_of[id(stats)] = name
        n_tokens[name] = stats.n_tokens
        for field in _STAT_FIELDS:
            value = getattr(stats, field)
            if value is not None:
                out.append((f"stats/{field}/{name}", lambda v=value: v, value.dtype, tuple(value.shape)))
    return out, n_tokens, alias


def artifact_tensors(artifact: Artifact, lm: LoadedModel, prefix: str = ""):
    """(entries, metadata) describing the artifact: entries are (key, reader, dtype, shape), read one
    at a time by `core.tensor_store.write_safetensors`; keys start with `prefix` (several artifacts
    can share one file, e.g. a saved explorer session)."""
    entries, n_tokens, alias = _entries(artifact)
    entries = [(prefix + key, read, dtype, shape) for key, read, dtype, shape in entries]
    profile = artifact.block_profile() if artifact.method_obj.allocates else None
    meta = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "method": artifact.method,
            "params": json.dumps(artifact.params), "protocol": json.dumps(artifact.protocol, default=str),
            **written_with(lm), "calibration_seconds": f"{artifact.calibration_seconds:.3f}",
            "n_tokens": json.dumps(n_tokens),
            "stats_alias": json.dumps(alias), "block_profile": json.dumps(profile),
            "block_of": json.dumps(artifact.block_of)}
    return entries, meta


def save_artifact(path: str | Path, artifact: Artifact, lm: LoadedModel) -> Path:
    """One safetensors file, written one tensor at a time (never the whole artifact in memory)."""
    path = Path(path)
    entries, meta = artifact_tensors(artifact, lm)
    atomic_write(path, lambda tmp: write_safetensors(tmp, entries, meta))
    return path


def read_artifact_meta(path: str | Path) -> dict:
    """An artifact's string metadata (method, parameters, the model it was calibrated on), read
    from the file's header alone: no tensor is loaded, so it can decide which model to load."""

    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"No calibration artifact at {path}.")
    try:
        meta, _, _ = read_header(path)
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"{path} is not a readable safetensors artifact ({exc}); calibrate again.") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise MaskFileError(f"{path} is not a calibration artifact written by this tool.")
    return meta


def load_artifact(path: str | Path, lm: LoadedModel, dense: DenseWeights | None = None) -> Artifact:
    """Open an artifact file for the loaded model: the header is read now, the tensors memory-mapped
    and read when a cut needs them. Refuses a corrupt file, an older format, or another model's."""
    path = Path(path)
    meta = read_artifact_meta(path)  # refuses a missing, unreadable or foreign file
    version = meta.get("format_version")
    if version != ARTIFACT_VERSION:
        raise MaskFileError(
            f"{path} is a calibration artifact of format version {version}; this tool reads version "
            f"{ARTIFACT_VERSION} (which stores ranks and sorted scores, so a cut never re-sorts). "
            "Calibrate again to make a new one; its masks are unchanged.")
    problem = mismatch(meta, lm, str(path), "calibrate again on this one.", made="calibrated on")
    if problem is not None:
        raise MaskFileError(problem)
    return artifact_from_tensors(FileStore(path, "the calibration artifact"), meta, lm, dense, where=str(path))


def artifact_from_tensors(store, meta: dict, lm: LoadedModel, dense: DenseWeights | None = None,
                          prefix: str = "", where: str = "the artifact") -> Artifact:
    """The artifact described by `meta` whose tensors are the `store`'s keys under `prefix` (a
    FileStore of an artifact file or of a saved session)."""
    dense = dense or DenseWeights(lm)
    shapes = dense.shapes()
    try:
        params, protocol = json.loads(meta["params"]), json.loads(meta["protocol"])
        n_tokens = json.loads(meta.get("n_tokens", "{}"))
        alias = json.loads(meta.get("stats_alias", "{}"))
        profile = json.loads(meta.get("block_profile", "null"))
        method = get_method(meta["method"])
    except (KeyError, ValueError) as exc:
        raise MaskFileError(f"{where} has damaged metadata ({exc}); calibrate again.") from exc
    base = _PrefixStore(store, prefix) if prefix else store
    artifact = Artifact(method.name, params, protocol, lm.fingerprint, dense, block_of=block_names(lm),
                        calibration_seconds=float(meta.get("calibration_seconds", 0)), base=base)
    for key in base.keys():
        kind, rest = key.split("/", 1)
        name = rest.split("/", 1)[1] if kind in ("rank", "extra", "stats") else rest
        if name not in shapes:
            raise MaskFileError(f"{where}: {name} is not one of the loaded model's matrices.")
        if kind in ("score", "rank") and tuple(base.shape(key)) != shapes[name]:
            raise MaskFileError(f"{where}: {name} does not match the loaded model's matrices.")
        if kind == "sorted" and tuple(base.shape(key)) != (math.prod(shapes[name]),):
            raise MaskFileError(f"{where}: {name} does not match the loaded model's matrices.")
        if kind == "stats":
            field = rest.split("/", 1)[0]
            if name not in artifact.stats:
                artifact.set_stats(name, LayerStats(n_tokens=int(n_tokens.get(name, 0))))
            setattr(artifact.stats[name], field, base.get(key))
    for name, owner in alias.items():
        artifact.set_stats(name, artifact.stats[owner])
    have = {key.split("/")[-1] for key in base.keys() if key.startswith(("score/", "rank/", "sorted/"))}
    missing = set(shapes) - have - set(artifact.stats)
    if method.stats == frozenset() and method.recomputes_scores():
        missing = set()  # scores of the weights alone (magnitude): nothing else is needed
    if missing:
        raise MaskFileError(f"{where} lacks {len(missing)} of the model's matrices (e.g. {sorted(missing)[0]}); "
                            "it is incomplete. Calibrate again.")
    if profile is not None:
        artifact.set_profile(profile)
    return artifact


class _PrefixStore:
    """The keys of a store under one prefix, without it."""

    def __init__(self, store, prefix: str):
        self._store, self._prefix = store, prefix

    def get(self, key: str, random_access: bool = False):
        return self._store.get(self._prefix + key, random_access)

    def keys(self) -> list[str]:
        return [k[len(self._prefix):] for k in self._store.keys() if k.startswith(self._prefix)]

    def shape(self, key: str):
        return self._store.shape(self._prefix + key)
