"""Where the commands write, checked before any work starts, and with ordinary permissions.

- `check_writable(path, kind)`: can `path` be created / written? A clear PruneError at once
  (a read-only place, a file where a folder is expected, a folder where a file is expected),
  before a model is loaded.
- `check_replaceable(out, inputs, force)`: may an export replace the folder `out`? Only if it
  is missing, empty or an earlier export (it carries the EXPORT_MARKER); anything else needs
  `force`; a folder that holds the export's inputs (or the home folder, or the current folder)
  never.
- `check_run_folder(out, force)`: may prune / cut write masks.safetensors and result.json into
  `out`? They overwrite only their own earlier files of those names.
- `file_mode()` / `dir_mode()` / `fix_modes(path)`: 0644 / 0755 under umask 022 (tempfile
  makes 0600 / 0700).
- `atomic_write(path, write)`: a file written beside itself and renamed into place; a disk that
  fills on the way ends in one `DiskFullError` (the place, the space needed, the space free) with
  the partial file gone (`reporting_disk_full`, `check_free_space` for the same before writing).
- `write_folder_atomically(out, write)`: the same for a folder (an export): filled beside itself,
  renamed into place, an earlier export moved aside and removed only once the new one is in place.
- `cache_dir()`, `process_folder(root, prefix)`, `new_offload_folder(parent, need)`: the tool's
  cache folder and the temporary folders one process owns (spills, offloaded blocks); those of a
  killed process are removed by the next.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ModelLoadError, PruneError

EXPORT_MARKER = "PRUNING.json"  # every folder an export writes has it (write_folder_atomically sees to it)
RUN_FILES = ("masks.safetensors", "result.json")  # what prune / cut write into their --out


class OutputError(PruneError):
    """An output location that cannot or must not be written."""


# ---------------------------------------------------------------- permissions

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def fix_modes(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain `open` /
    `mkdir` would have: tempfile.mkstemp / mkdtemp make them private (0600 / 0700)."""
    path = Path(path)
    fmode, dmode = file_mode(), dir_mode()
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


# ---------------------------------------------------------------- can it be written?

def _deepest_existing(path: Path, what: str) -> Path:
    """The nearest existing ancestor of `path` (or path itself); refuse a file on the way."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputError(f"{what} {path}: {candidate} is a file, not a folder, so nothing can be "
                                  f"created under it. Choose another {what}.")
            return candidate
    return Path(path.anchor or ".")


def check_writable(path: str | Path, kind: str = "file", what: str = "--out") -> Path:
    """Check at once that `path` can be written, before any work. `kind`:
    "file" (a file written at `path`), "folder" (files written into the folder `path`),
    "replace" (the folder `path` written beside itself and renamed into place: its parent must be
    writable). Probes by creating and removing a temporary file. Returns the absolute path."""
    path = Path(os.path.expanduser(str(path))).absolute()
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name (for example {path / 'out'}).")
    if kind in ("folder", "replace") and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder. Remove it or choose another {what}.")
    target = path if kind == "folder" else path.parent
    base = _deepest_existing(target, what)
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"Cannot write {what} {path}: {base} is not writable ({exc.strerror or exc}). "
                          f"Choose a folder you can write to, or fix its permissions.") from None
    return path


# ---------------------------------------------------------------- may it be replaced?

def is_export_folder(path: str | Path) -> bool:
    """A folder an export wrote: it carries EXPORT_MARKER (a JSON object)."""
    marker = Path(path) / EXPORT_MARKER
    try:
        return marker.is_file() and isinstance(json.loads(marker.read_text()), dict)
    except (OSError, ValueError):
        return False


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _resolved(path: str | Path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def _safe(where) -> Path | None:
    try:
        return where()
    except (OSError, RuntimeError):  # a deleted current folder, no home
        return None


def check_replaceable(out: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse (OutputError, touching nothing) to replace the folder `out` unless it is missing,
    empty or an earlier export; `force` allows any other folder, except one that holds an input
    (a path in `inputs`), the home folder or the current folder: those never."""
    out_path = Path(os.path.expanduser(str(out)))
    real = _resolved(out_path)
    for item in inputs:
        if item is not None and _within(_resolved(item), real):
            raise OutputError(f"--out {out_path} holds this export's input {item}; exporting there would "
                              f"delete it. Choose another --out folder (for example {out_path / 'model'}); "
                              f"--force does not allow this.")
    for name, keep in (("your home folder", _safe(Path.home)), ("the current folder", _safe(Path.cwd))):
        if keep is not None and _within(_resolved(keep), real):
            raise OutputError(f"--out {out_path} is or contains {name}, which an export never replaces. "
                              f"Choose a new folder for the export (for example {out_path / 'model'}).")
    if not out_path.exists() and not out_path.is_symlink():
        return out_path
    if not out_path.is_dir():
        raise OutputError(f"--out {out_path} is a file, not a folder. Remove it or choose another --out.")
    if is_export_folder(out_path) or not any(out_path.iterdir()) or force:
        return out_path
    raise OutputError(f"--out {out_path} already exists and is not an earlier export (it has no "
                      f"{EXPORT_MARKER}); the export would replace everything in it. Choose a new or empty "
                      f"folder, or pass --force to replace it (the old folder is removed only once the new "
                      f"one is complete).")


def _is_run_file(path: Path) -> bool:
    """masks.safetensors / result.json as prune and cut write them."""
    try:
        if path.name == "masks.safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get("format") == "pruning-explorer-masks"
        data = json.loads(path.read_text())
        return isinstance(data, dict) and "method" in data and "achieved_sparsity" in data
    except Exception:  # unreadable, not safetensors, not JSON: not ours
        return False


def check_run_folder(out: str | Path, force: bool = False) -> Path:
    """prune / cut write RUN_FILES into `out` (other files there are left alone). Refuse at once
    if `out` cannot be written, or if it holds a file of those names that they did not write,
    unless `force`."""
    path = check_writable(out, "folder")
    for name in RUN_FILES:
        existing = path / name
        if existing.is_dir():
            raise OutputError(f"--out {path} has a folder named {name}, where this command writes a file. "
                              f"Choose another --out folder.")
        if existing.exists() and not force and not _is_run_file(existing):
            raise OutputError(f"--out {path} already has a {name} that this tool did not write; it would be "
                              f"overwritten. Choose another --out folder, or pass --force to overwrite it.")
    return path


# ---------------------------------------------------------------- the cache folder

def cache_dir() -> Path:
    """Where converted models live: $PRUNE_EXPLORER_CACHE or ~/.cache/pruning-explorer."""
    root = os.environ.get("PRUNE_EXPLORER_CACHE") or Path.home() / ".cache" / "pruning-explorer"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- folders owned by one process

def process_folder(root: str | Path, prefix: str) -> Path:
    """A new folder `<prefix><pid>-<random>` under `root` for this process's temporary files
    (spilled weights, offloaded blocks, an artifact being made, the app's session files). The
    caller removes it when done; folders of this prefix left by processes that no longer run
    (killed before they could clean up) are removed here first."""
    import shutil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


_OFFLOAD_FOLDERS: list[Path] = []


def new_offload_folder(parent: str | Path | None, need: int) -> str:
    """A fresh folder of this process for pruned blocks written during --offload disk (inside
    `parent`, else the cache folder), checked writable and with room for `need` bytes (the decoder
    blocks' weights; 0: unknown), removed when the process exits."""
    # a folder of the tool's own inside a user-given one: folders left there by killed runs are
    # removed (process_folder), and nothing else of the user's can match
    root = Path(parent).expanduser() / "pruning-explorer-offload" if parent else cache_dir() / "offload"
    try:
        folder = process_folder(root, "offload-")
    except OSError as exc:
        raise ModelLoadError(f"Cannot write the offload folder in {root} ({exc.strerror or exc}). "
                             "Point --offload-folder at a writable disk.") from exc
    free = shutil.disk_usage(folder).free
    if need * 1.05 > free:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelLoadError(
            f"--offload disk writes pruned blocks to {root}: up to {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is free there. Point --offload-folder at a disk with more room.")
    if not _OFFLOAD_FOLDERS:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _OFFLOAD_FOLDERS])
    _OFFLOAD_FOLDERS.append(folder)
    return str(folder)


# ---------------------------------------------------------------- a disk that fills

_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# how libraries that do not raise OSError report it: safetensors' Rust writer raises a
# SafetensorError whose text carries the OS error ("StorageFull", "No space left on device")
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


class DiskFullError(OutputError):
    """A write that ran out of disk space. The message names the place, the space the write needed
    and the space free there; whatever was partly written has been removed. `need`: bytes, or None
    when the writer could not know."""

    def __init__(self, message: str, place: str | Path | None = None, need: int | None = None):
        super().__init__(message)
        self.place, self.need = place, need


def is_no_space(exc: BaseException | None) -> bool:
    """Whether `exc` (or an error it was raised from) says the disk or the quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(exc) for text in _NO_SPACE_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def human_bytes(n: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(place: str | Path) -> int | None:
    """Free space (for an unprivileged writer) on the disk that holds `place` or its nearest
    existing parent; None when it cannot be told."""
    for candidate in (Path(place), *Path(place).parents):
        try:
            if candidate.exists():
                return shutil.disk_usage(candidate).free
        except OSError:
            return None
    return None


def disk_full_error(place: str | Path, what: str, need: int | None = None, hint: str = "") -> DiskFullError:
    """The one-line error for `what` not fitting at `place`, with the free space measured now (so
    after the caller removed what it had partly written)."""
    free = free_bytes(place)
    needs = f"it needs {human_bytes(need)}" if need else "it needs more room"
    has = f"{human_bytes(free)} is free there" if free is not None else "the free space there is unknown"
    advice = hint or "Free some space there or write to another disk."
    return DiskFullError(f"No space left on device for {what} in {place}: {needs}, {has}. {advice}", place, need)


@contextmanager
def reporting_disk_full(place: str | Path, what: str, need: int | None = None, hint: str = "") -> Iterator[None]:
    """A disk-full error inside the with-block (any library's way of saying it) comes out as one
    DiskFullError naming `place` and `what`; other errors pass unchanged. The block must remove its
    own partial files (a try/finally inside it) so that the free space reported is what is left."""
    try:
        yield
    except Exception as exc:
        if not is_no_space(exc):
            raise
        need = need or getattr(exc, "need", None)  # a writer that knew its size says so
        raise disk_full_error(place, what, need, hint) from exc


def check_free_space(place: str | Path, need: int, what: str, hint: str = "") -> None:
    """Refuse at once (DiskFullError) a write of `need` bytes that cannot fit at `place`."""
    free = free_bytes(place)
    if free is not None and need > free:
        raise disk_full_error(place, what, need, hint)


def preallocate(fh, size: int, path: str | Path = "") -> None:
    """Reserve `size` bytes for the open file `fh` before writing, so that a disk too full for it
    says so now (ENOSPC), not half way through, and never later through a memory map (a write
    into a mapped page the disk has no room for kills the process with SIGBUS). Where the
    filesystem or OS cannot preallocate, the plain writes that follow still report ENOSPC."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            error = DiskFullError(f"No space left on device for {size} bytes at {path or fh.name}", path, size)
            raise error from exc
        # EOPNOTSUPP / EINVAL: this filesystem does not preallocate; the writes will tell


def atomic_write(path: str | Path, write: Callable[[str], None], what: str | None = None,
                 need: int | None = None) -> None:
    """`write(tmp)` fills a temporary file in the same folder, then it is renamed to `path`: never
    a half file. The file gets the umask's ordinary mode (0644 under umask 022), not mkstemp's 0600.
    A disk that fills ends in a DiskFullError naming `path` (after the temporary file is removed)."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # folders this call creates
    with reporting_disk_full(path.parent, what or path.name, need):
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            _remove_empty(made)  # a failed write leaves no folder it made either
            raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) where they are empty; leave any that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_text_atomic(path: str | Path, text: str, what: str | None = None) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), what, len(data))


# ---------------------------------------------------------------- folders written whole

def write_folder_atomically(out: str | Path, write: Callable[[Path], None], *, force: bool = False,
                            inputs: Iterable[str | Path] = (), need: int | None = None) -> Path:
    """Run `write(staging)` on a fresh folder beside `out`, then rename it to `out`: the folder
    appears only once complete, and a failed write leaves no trace.

    An existing `out` is replaced only if it is empty or an earlier export (it carries
    EXPORT_MARKER, which every folder written here gets); any other folder needs `force`, and a
    folder holding one of `inputs` is never replaced (check_replaceable). The old
    folder is moved aside under a unique name, removed only once the new one is in place, and put
    back if that fails. Files and folders get the umask's ordinary modes (0644 / 0755).

    `need`: the bytes the folder will take (its weights), checked against the free space before
    anything is written; a disk that fills anyway ends in one DiskFullError, the partial folder gone."""
    out = check_replaceable(out, inputs, force)
    what = f"the export {out.name}/"
    if need:
        check_free_space(out.parent, need, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=".partial"))
    except OSError as exc:
        if is_no_space(exc):
            raise disk_full_error(out.parent, what, need) from exc
        raise OutputError(f"Cannot write the export folder {out}: {exc.strerror or exc}. Choose a folder "
                          f"you can write to.") from None
    with reporting_disk_full(out.parent, what, need):  # outside the finally below: the space free after it
        _fill_and_rename(out, staging, write)
    return out


def _fill_and_rename(out: Path, staging: Path, write: Callable[[Path], None]) -> None:
    """write_folder_atomically's work: fill `staging`, move it to `out` (the old `out` moved aside,
    removed once the new one is in place); `staging` is gone afterwards whatever happened."""
    try:
        write(staging)
        if not (staging / EXPORT_MARKER).exists():
            (staging / EXPORT_MARKER).write_text(json.dumps({"written_by": "pruning-explorer export"}))
        fix_modes(staging)
        if out.exists() or out.is_symlink():
            # A unique name for the old folder (no fixed "out.old" to collide with): inside a
            # fresh folder beside it, so the rename never lands on something that exists.
            holder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=".old"))
            backup = holder / out.name
            os.rename(out, backup)
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(backup, out)  # put the old folder back
                os.rmdir(holder)
                raise
            shutil.rmtree(holder, ignore_errors=True)  # the new folder is in place: now the old goes
        else:
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
