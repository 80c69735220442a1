"""The dense weights behind every cut: apply a mask set to the model, and put the dense weights back,
without a second in-memory copy of the weights.

The original of every prunable weight is read, one matrix at a time, from where it already is:
- the checkpoint's safetensors file the model was loaded from (a bundled model's cache folder
  too), after checking that the loaded weights are what the file holds;
- for a weight offloaded by accelerate (`--offload disk`), the checkpoint entry its weights map
  pointed at (restore points it back there);
- otherwise (a model built in memory, a GGUF file read directly, a .bin checkpoint) a spill file
  this class writes once, block by block, in the cache folder, and removes when it is dropped.

Only the matrices a mask set changed are read back on restore (`_changed`). Code that writes
prunable weights by other means than `write` / `apply` (a method's own search, backprop) must
call `note_changed` so that restore puts them back.
"""
from __future__ import annotations

import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import ModelLoadError
from .loaded_model import LoadedModel
from .maskset import MaskSet
from .outputs import cache_dir, process_folder
from .offload import is_offloaded, offload_entry, read_offloaded, set_offload_entry, write_offloaded
from .sources import WatchedFiles

class DenseWeights:
    """Apply masks to a model and restore its dense weights; `weight(name)` reads a dense weight."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.modules = lm.prunable()
        self._shapes = {name: tuple(lm.family.weight_view(m).shape) for name, m in self.modules.items()}
        # biases as loaded (None: the module had none, and a compensation bias is removed again): a
        # vector per matrix, small enough to keep
        self.dense_bias = {name: None if getattr(m, "bias", None) is None else m.bias.data.clone()
                           for name, m in self.modules.items()}
        self._biased: set[str] = set()  # modules whose bias a mask set changed
        self._changed: set[str] = set()  # modules whose weight differs from the dense original now
        self._epoch: dict[str, int] = {}  # per module, bumped on every write: CurrentWeights' staleness check
        self._entries: dict[str, dict] = {}  # offloaded module -> its checkpoint entry
        self._files: dict[str, tuple[str, str]] = {}  # module -> (safetensors file, key) holding its original
        self._spill_dir: Path | None = None
        spill = []
        checkpoint = _checkpoint_keys(getattr(lm, "checkpoint", None))
        for name, module in self.modules.items():
            if is_offloaded(module):
                entry = offload_entry(module)
                if entry is not None and entry.get("safetensors_file"):
                    self._entries[name] = entry
                else:
                    spill.append(name)
                continue
            found = checkpoint.get(f"{name}.weight")
            if found is not None and _holds(found, f"{name}.weight", module.weight.data):
                self._files[name] = (found, f"{name}.weight")
            else:
                spill.append(name)
        if spill:
            self._spill(spill)
        # every file an original is read back from, watched: a checkpoint replaced by a later export
        # or a deleted cache must stop restores, not feed them other weights
        self._watch = WatchedFiles(sorted({path for path, _key in self._files.values()}
                                          | {e["safetensors_file"] for e in self._entries.values()}))

    # ---------------------------------------------------------------- reading the originals

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    @property
    def spill_folder(self) -> Path | None:
        """The folder of originals this object wrote (None when every original is in a file already)."""
        return self._spill_dir

    def sources(self) -> dict[str, str]:
        """Where each matrix's dense original is read from: 'checkpoint', 'offload' or 'spill'."""
        return {name: "offload" if name in self._entries else
                "spill" if self._spill_dir is not None and Path(self._files[name][0]).parent == self._spill_dir
                else "checkpoint" for name in self.modules}

    def source_problem(self) -> str | None:
        """What happened to a file the dense originals are read from (None while they are intact)."""
        return self._watch.problem()

    def check_sources(self) -> None:
        """Refuse (SourceChanged) once a file of dense originals changed or vanished: from then on
        nothing can be restored to, or called, the dense model."""
        self._watch.check(f"the dense weights of {self.lm.model_id}",
                          "Nothing is called dense any more: load the model again (the explorer's Load button; "
                          "on the command line, run the command again), which reads the weights now on disk.")

    def _read_param(self, name: str) -> torch.Tensor:
        """The dense original in the parameter's layout and dtype, on the CPU."""
        self.check_sources()
        module = self.modules[name]
        if name in self._entries:
            entry = self._entries[name]
            tensor = _read(entry["safetensors_file"], entry.get("weight_name", f"{name}.weight"))
            dtype = getattr(torch, entry["dtype"]) if "dtype" in entry else module.weight.dtype
            return tensor.to(dtype)
        path, key = self._files[name]
        return _read(path, key).to(module.weight.dtype)

    def weight(self, name: str) -> torch.Tensor:
        """The dense weight of one matrix, (d_out, d_in). While the module holds it unchanged this
        is the module's own tensor (do not write to it); otherwise it is read from its original."""
        module = self.modules[name]
        live = module.weight.device.type != "meta"
        if name not in self._changed and live:
            return self.lm.family.weight_view(module)
        tensor = self._read_param(name)
        if live:
            tensor = tensor.to(module.weight.device)
        return tensor.t() if self.lm.family.conv1d else tensor

    def current(self, name: str) -> torch.Tensor:
        """One matrix's weight as the model holds it now (d_out, d_in), masked or not."""
        module = self.modules[name]
        if module.weight.device.type != "meta":
            return self.lm.family.weight_view(module)
        tensor = read_offloaded(module)
        return tensor.t() if self.lm.family.conv1d else tensor

    def current_weights(self) -> "CurrentWeights":
        """An empty CurrentWeights over this model (see there)."""
        return CurrentWeights(self)

    def epoch(self, name: str) -> int:
        return self._epoch.get(name, 0)

    def _bump(self, name: str) -> None:
        self._epoch[name] = self._epoch.get(name, 0) + 1

    # ---------------------------------------------------------------- writing

    @torch.no_grad()
    def write(self, name: str, weight: torch.Tensor) -> None:
        """Set one matrix's weight (d_out, d_in) in the model (or in its offload store)."""
        module = self.modules[name]
        if is_offloaded(module):
            write_offloaded(module, weight.t() if self.lm.family.conv1d else weight)
        else:
            self.lm.family.weight_view(module).copy_(weight)
        self._changed.add(name)
        self._bump(name)

    def note_changed(self, names=None) -> None:
        """Record that weights were changed outside `write`/`apply` (all prunable ones if None)."""
        names = list(self.modules if names is None else names)
        self._changed.update(names)
        for name in names:
            self._bump(name)

    @torch.no_grad()
    def apply(self, mask_set: MaskSet) -> None:
        """Set each weight to (updated or dense weight) * mask, one matrix at a time; layers the mask
        set does not cover are restored."""
        self.check_sources()
        for name, module in self.modules.items():
            mask = mask_set.masks.get(name)
            update = mask_set.weights.get(name)
            if mask is None and update is None:
                self._restore_one(name)
                continue
            if not is_offloaded(module) and update is None and name not in self._changed:
                view = self.lm.family.weight_view(module)
                view.mul_(mask.to(view.device))  # dense in place: no read needed
                self._changed.add(name)
                self._bump(name)
                continue
            source = update if update is not None else self.weight(name)
            if not is_offloaded(module):
                view = self.lm.family.weight_view(module)
                if mask is None:
                    view.copy_(source)
                else:
                    torch.mul(source.to(view.device), mask.to(view.device), out=view)  # one pass
                self._changed.add(name)
                self._bump(name)
            else:
                self.write(name, source if mask is None else source * mask.to(source.device))
        self._restore_biases(keep=set(mask_set.biases))
        for name, bias in mask_set.biases.items():
            self._set_bias(name, bias)

    @torch.no_grad()
    def restore(self) -> None:
        """Every changed weight back to its dense original, read from where it is kept (refused, with
        the model left as it is, when those files changed)."""
        self.check_sources()
        for name in [n for n in self.modules if n in self._changed]:
            self._restore_one(name)
        self._restore_biases()

    def _restore_one(self, name: str) -> None:
        if name not in self._changed:
            return
        module = self.modules[name]
        if name in self._entries:  # offloaded: point the weights map back at the checkpoint
            set_offload_entry(module, self._entries[name])
            if module.weight.device.type != "meta":
                module.weight.data.copy_(self._read_param(name).to(module.weight.device))
        elif is_offloaded(module):
            write_offloaded(module, self._read_param(name))
        else:
            module.weight.data.copy_(self._read_param(name).to(module.weight.device))
        self._changed.discard(name)
        self._bump(name)

    def _set_bias(self, name: str, bias: torch.Tensor) -> None:
        module = self.modules[name]
        if is_offloaded(module):
            raise ModelLoadError("Compensation biases (structured methods) need the model in memory: "
                                 "load it with --offload none.")
        weight = module.weight
        if getattr(module, "bias", None) is None:
            module.bias = torch.nn.Parameter(torch.zeros(bias.shape, dtype=weight.dtype, device=weight.device),
                                             requires_grad=False)
        module.bias.data.copy_(bias)
        self._biased.add(name)

    def _restore_biases(self, keep: set | frozenset = frozenset()) -> None:
        for name in list(self._biased - set(keep)):
            module, original = self.modules[name], self.dense_bias[name]
            if original is None:
                module.bias = None
            else:
                module.bias.data.copy_(original)
            self._biased.discard(name)

    # ---------------------------------------------------------------- the spill file

    def _spill(self, names: list[str]) -> None:
        """Write the originals that no file holds yet, block by block, into a folder of this process
        (removed when this object is dropped or the process exits)."""
        from safetensors.torch import save_file

        need = sum(self.modules[n].weight.numel() * self.modules[n].weight.element_size() for n in names)
        root = cache_dir() / "dense-spill"
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need * 1.05 + 2**28 > free:
            raise ModelLoadError(
                f"Restoring this model's dense weights needs a copy of {need / 2**30:.1f} GiB on disk in {root} "
                f"(the model was not loaded from a safetensors checkpoint), but only {free / 2**30:.1f} GiB is free. "
                "Free some space, set PRUNE_EXPLORER_CACHE to a bigger disk, or load the model from a "
                "safetensors folder.")
        folder = process_folder(root, "dense-")
        self._spill_dir = folder
        weakref.finalize(self, shutil.rmtree, str(folder), True)
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.rsplit(".", 2)[0], []).append(name)
        for index, group in enumerate(groups.values()):
            path = folder / f"part-{index:05d}.safetensors"
            tensors = {}
            for name in group:
                module = self.modules[name]
                weight = read_offloaded(module) if is_offloaded(module) else module.weight.data
                tensors[f"{name}.weight"] = weight.detach().to("cpu").contiguous()
            save_file(tensors, str(path))
            for name in group:
                self._files[name] = (str(path), f"{name}.weight")
            del tensors


class CurrentWeights(Mapping):
    """Some matrices' weights as the model holds them now, read when asked, so a weight-updating
    prune of a big model keeps no second copy of what it wrote. A weight written again since it was
    tracked (a restore, another mask set) is refused rather than silently read changed."""

    def __init__(self, dense: DenseWeights):
        self._dense = dense
        self._epochs: dict[str, int] = {}

    def track(self, name: str) -> None:
        self._epochs[name] = self._dense.epoch(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._epochs:
            raise KeyError(name)
        if self._dense.epoch(name) != self._epochs[name]:
            raise RuntimeError(f"The pruned weights of {name} were changed since this prune (restored or "
                               "another mask set applied); prune again, or save the masks right after pruning.")
        return self._dense.current(name)

    def __iter__(self):
        return iter(self._epochs)

    def __len__(self) -> int:
        return len(self._epochs)


def _read(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return fh.get_tensor(key)


def _checkpoint_keys(folder) -> dict[str, str]:
    """Tensor name -> safetensors file, over a checkpoint folder's safetensors files (headers only)."""
    if folder is None:
        return {}
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    out.setdefault(key, str(path))
        except Exception:  # an unreadable file is simply not used as a source
            continue
    return out


def _holds(path: str, key: str, loaded: torch.Tensor) -> bool:
    """Whether the file's tensor is the loaded one: same shape, and three of its rows identical after
    the dtype conversion loading made (a model renamed or converted on load fails this)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            part = fh.get_slice(key)
            shape = tuple(part.get_shape())
            if shape != tuple(loaded.shape) or not shape:
                return False
            for row in sorted({0, shape[0] // 2, shape[0] - 1}):
                stored = part[row:row + 1].to(loaded.dtype)
                if not torch.equal(stored, loaded[row:row + 1].to("cpu")):
                    return False
    except Exception:
        return False
    return True
