"""Text sources and the windows cut from them for calibration and evaluation.

Sources (the `source` strings the CLI and the explorer accept):

- ``python-docs`` (the offline default): the English prose of Python's own documentation
  topics, which ships with every CPython as the stdlib module ``pydoc_data.topics`` (about
  465k characters, PSF licence). No hub, no download, no ../shared needed. Its first 80% of
  topics is the evaluation part and the last 20% the calibration part, so the two never overlap.
- ``wikitext2``: WikiText-2 raw from the Hugging Face Hub (train split for calibration, test
  split for evaluation), through ``datasets``.
- ``c4``: the first shard of allenai/c4 (en) by ``data_files`` (train for calibration,
  validation for evaluation).
- a path to a ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file (json/parquet: the
  ``text`` field of every record). The same file is used for either part; pass different files
  for calibration and evaluation to keep them disjoint.

Windows follow the field's convention: the text is joined and tokenized once; calibration
windows start at positions drawn by ``random.Random(seed).randint(0, n_tokens - seqlen - 1)``
(the wt2-512 protocol); evaluation windows are the first non-overlapping ``seqlen`` chunks.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import DataError
from .families import context_length

DEFAULT_SOURCE = "python-docs"
HUB_SOURCES = ("wikitext2", "c4")


def _python_docs(part: str) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * 0.8)
    chosen = keys[:cut] if part == "evaluation" else keys[cut:]
    return "\n\n".join(topics[key].strip() for key in chosen)


def _hub_text(source: str, part: str) -> str:
    try:
        from datasets import load_dataset

        if source == "wikitext2":
            split = "test" if part == "evaluation" else "train"
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        name = "validation" if part == "evaluation" else "train"
        shard = f"en/c4-{name}.00000-of-{'00008' if name == 'validation' else '01024'}.json.gz"
        rows = load_dataset("allenai/c4", data_files={name: shard}, split=name)
        return "\n\n".join(rows["text"][:3000])
    except Exception as exc:  # datasets raises many types when the hub is unreachable
        raise DataError(
            f"Could not fetch {source!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"Use the offline default {DEFAULT_SOURCE!r} or a local .txt/.jsonl/.json/.parquet file."
        ) from exc


def _records_text(records) -> str:
    texts = [r["text"] for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]
    if not texts:
        raise DataError("The file has no records with a string 'text' field; give each record one.")
    return "\n\n".join(texts)


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"No text file at {path}. Check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt" or suffix == ".raw":
            return path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return _records_text(json.loads(line) for line in lines if line.strip())
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return _records_text(data if isinstance(data, list) else [data])
        if suffix == ".parquet":
            from datasets import Dataset

            return _records_text(Dataset.from_parquet(str(path)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Could not read {path}: {exc}. Is it really a {suffix} file in UTF-8?") from exc
    raise DataError(f"Unsupported text file type {suffix!r}; use .txt, .jsonl, .json or .parquet.")


def load_text(source: str = DEFAULT_SOURCE, part: str = "calibration") -> str:
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', not {part!r}")
    if source in (DEFAULT_SOURCE, "default"):
        return _python_docs(part)
    if source in HUB_SOURCES:
        return _hub_text(source, part)
    return _file_text(Path(source).expanduser())


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids


@dataclass(frozen=True)
class WindowProtocol:
    """What to record beside any number computed on these windows."""

    source: str
    part: str
    seqlen: int
    n_windows: int
    n_tokens: int
    seed: int | None

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        how = f"random starts, seed {self.seed}" if self.seed is not None else "first non-overlapping"
        return (f"{self.source} ({self.part}), {self.n_windows} x {self.seqlen} tokens, {how}; "
                f"{self.n_tokens} tokens in the text")


def _check_length(ids: torch.Tensor, seqlen: int, source: str, need: int | None = None) -> None:
    """`need`: the fewest tokens that give one window (seqlen + 1 for random starts)."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, not {seqlen}.")
    need = seqlen if need is None else need
    if ids.numel() < need:
        raise DataError(
            f"The text from {source!r} has {ids.numel()} tokens, too few for one window of "
            f"{seqlen} (it needs {need}). Use a longer text or a smaller --seqlen."
        )


def check_seqlen(model, seqlen: int) -> None:
    """Refuse windows longer than the model's context, before any forward pass.

    `model`: a LoadedModel or a transformers config. Beyond its context GPT-2 and OPT fail deep
    in the position embedding (IndexError), and RoPE models run on silently, out of the range
    they were trained on; either way the numbers would mean nothing.
    """

    config = getattr(model, "config", model)
    context = context_length(config)
    seqlen = int(seqlen)
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, not {seqlen}.")
    if context is not None and seqlen > context:
        name = getattr(model, "model_id", None) or getattr(config, "name_or_path", None) or "the model"
        raise DataError(
            f"seqlen {seqlen} is longer than the context of {name} ({context} tokens, the most "
            f"positions it takes in one window). Use a seqlen of at most {context}."
        )


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0,
                        source: str = "?") -> tuple[torch.Tensor, WindowProtocol]:
    """`n` windows of `seqlen` tokens at seeded random starts: (n, seqlen) int64."""
    _check_length(ids, seqlen, source, need=seqlen + 1)  # randint(0, n_tokens - seqlen - 1)
    if n < 1:
        raise DataError(f"The number of calibration windows must be at least 1, not {n}.")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    windows = torch.stack([ids[s:s + seqlen] for s in starts])
    return windows, WindowProtocol(source, "calibration", seqlen, n, int(ids.numel()), seed)


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                       source: str = "?") -> tuple[torch.Tensor, WindowProtocol]:
    """The first non-overlapping `seqlen` windows (at most `max_windows`): (n, seqlen) int64."""
    _check_length(ids, seqlen, source)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)
    return windows, WindowProtocol(source, "evaluation", seqlen, n, int(ids.numel()), None)


def calibration_set(tokenizer, source: str = DEFAULT_SOURCE, n: int = 64, seqlen: int = 512,
                    seed: int = 0) -> tuple[torch.Tensor, WindowProtocol]:
    return calibration_windows(tokenize(tokenizer, load_text(source, "calibration")), n, seqlen, seed, source)


def evaluation_set(tokenizer, source: str = DEFAULT_SOURCE, seqlen: int = 512,
                   max_windows: int | None = 64) -> tuple[torch.Tensor, WindowProtocol]:
    return evaluation_windows(tokenize(tokenizer, load_text(source, "evaluation")), seqlen, max_windows, source)
