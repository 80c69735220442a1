"""Calibration artifacts on disk: calibrate once (minutes), cut any sparsity later (seconds),
in another session or on another day. One safetensors file: per matrix the scores, the
method's extra tensors (UniPruning's first-step), and the input statistics (for weight-updating
methods, and instead of the scores where those are recomputed from them: Wanda, RIA, OWL,
magnitude; see Artifact.recomputes_scores); string metadata says which method, parameters,
protocol and model made it. Ranks are computed again on load."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .calibrate import LayerStats
from .errors import MaskFileError
from .masks import _atomic_write
from .dense import DenseWeights
from .models import LoadedModel
from .pruning import Artifact, _block_names, _scope

ARTIFACT_FORMAT = "pruning-explorer-artifact"
ARTIFACT_VERSION = "1"
_STAT_FIELDS = ("sum_x2", "sum_x", "xtx")


def save_artifact(path: str | Path, artifact: Artifact, lm: LoadedModel) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, scores in artifact.scores.items():
        tensors[f"score/{name}"] = scores.contiguous()
    for name, extras in artifact.extras.items():
        for kind, tensor in extras.items():
            tensors[f"extra/{kind}/{name}"] = tensor.contiguous()
    n_tokens, alias, owner_of = {}, {}, {}
    for name, stats in artifact.stats.items():
        if id(stats) in owner_of:  # modules fed one input share one LayerStats: store it once
            alias[name] = owner_of[id(stats)]
            continue
        owner_of[id(stats)] = name
        n_tokens[name] = stats.n_tokens
        for field in _STAT_FIELDS:
            value = getattr(stats, field)
            if value is not None:
                tensors[f"stats/{field}/{name}"] = value.contiguous()
    meta = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "method": artifact.method,
            "params": json.dumps(artifact.params), "protocol": json.dumps(artifact.protocol, default=str),
            "model_id": lm.model_id, "model_fingerprint": lm.fingerprint,
            "calibration_seconds": f"{artifact.calibration_seconds:.3f}", "n_tokens": json.dumps(n_tokens), "stats_alias": json.dumps(alias)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_artifact_meta(path: str | Path) -> dict:
    """An artifact's string metadata (method, parameters, the model it was calibrated on), read
    from the file's header alone: no tensor is loaded, so it can decide which model to load."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"No calibration artifact at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise MaskFileError(f"{path} is not a readable safetensors artifact ({exc}); calibrate again.") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise MaskFileError(f"{path} is not a calibration artifact written by this tool.")
    return meta


def load_artifact(path: str | Path, lm: LoadedModel, dense: DenseWeights | None = None) -> Artifact:
    """Read an artifact for the loaded model; refuse a corrupt file or one made for another model."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_artifact_meta(path)  # refuses a missing, unreadable or foreign file
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:
        raise MaskFileError(f"{path} is not a readable safetensors artifact ({exc}); calibrate again.") from exc
    if meta.get("format_version") != ARTIFACT_VERSION:
        raise MaskFileError(f"{path} has artifact format {meta.get('format_version')}; this tool reads "
                            f"{ARTIFACT_VERSION}. Calibrate again.")
    if meta.get("model_fingerprint") != lm.fingerprint:
        raise MaskFileError(f"{path} was calibrated on {meta.get('model_id')!r}, not on the loaded "
                            f"{lm.model_id!r}. Load that model, or calibrate this one.")
    dense = dense or DenseWeights(lm)
    shapes = dense.shapes()
    artifact = Artifact(meta["method"], json.loads(meta["params"]), json.loads(meta["protocol"]),
                        lm.fingerprint, dense, block_of=_block_names(lm),
                        calibration_seconds=float(meta.get("calibration_seconds", 0)))
    method = artifact.method_obj
    n_tokens = json.loads(meta.get("n_tokens", "{}"))
    for key, tensor in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "score":
            _check_shape(path, rest, tensor, shapes)
            artifact.set_scores(rest, tensor, _scope(method, artifact.params))
        elif kind == "extra":
            extra, name = rest.split("/", 1)
            artifact.extras.setdefault(name, {})[extra] = tensor
        elif kind == "stats":
            field, name = rest.split("/", 1)
            stats = artifact.stats.setdefault(name, LayerStats(n_tokens=int(n_tokens.get(name, 0))))
            setattr(stats, field, tensor)
    for name, owner in json.loads(meta.get("stats_alias", "{}")).items():
        artifact.stats[name] = artifact.stats[owner]
    missing = set(shapes) - set(artifact.scores) - set(artifact.stats)
    if method.stats == frozenset() and artifact.recomputes_scores:
        missing = set()  # scores of the weights alone (magnitude): nothing to store
    if missing:
        raise MaskFileError(f"{path} lacks {len(missing)} of the model's matrices (e.g. {sorted(missing)[0]}); "
                            "it is incomplete. Calibrate again.")
    scope = _scope(method, artifact.params)
    for name in artifact.block_of:  # scores kept as statistics: rank them now, one matrix at a time
        if name not in artifact.scores and artifact._can_recompute(name):
            artifact.set_scores(name, artifact.score(name), scope)
    return artifact


def _check_shape(path: Path, name: str, tensor: torch.Tensor, shapes: dict) -> None:
    if name not in shapes or tuple(tensor.shape) != shapes[name]:
        raise MaskFileError(f"{path}: {name} does not match the loaded model's matrices.")
