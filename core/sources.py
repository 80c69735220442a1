"""Files read again after they were opened: the checkpoint that dense weights are restored from,
the spill file of originals, a memory-mapped artifact or session file. Each is recorded by its
identity (device, inode, size, modification time) when opened, and checked before it is read
again, so a file replaced by a later export, edited in place or deleted is noticed instead of
silently read (or, for a truncated memory map, crashing the process with SIGBUS)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceChanged


@dataclass(frozen=True)
class FileIdentity:
    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path) -> "FileIdentity":
        st = os.stat(path)
        return cls(str(Path(path)), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change(self) -> str | None:
        """What happened to the file since it was recorded, in words; None if it is unchanged."""
        try:
            now = FileIdentity.of(self.path)
        except FileNotFoundError:
            return f"{self.path} was deleted"
        except OSError as exc:
            return f"{self.path} can no longer be read ({exc.strerror or exc})"
        if (now.device, now.inode) != (self.device, self.inode):
            return f"{self.path} was replaced by another file ({_sizes(self, now)}, written {_when(now)})"
        if (now.size, now.mtime_ns) != (self.size, self.mtime_ns):
            return f"{self.path} was modified in place ({_sizes(self, now)}, written {_when(now)})"
        return None


def _sizes(before: FileIdentity, now: FileIdentity) -> str:
    if before.size == now.size:
        return f"same size, {now.size:,} bytes"
    return f"{before.size:,} bytes when opened, {now.size:,} now"


def _when(identity: FileIdentity) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(identity.mtime_ns / 1e9))


class WatchedFiles:
    """The identities of some files, checked together. Once a change is found it is remembered:
    a file put back later does not make what was read in between trustworthy again."""

    def __init__(self, paths=()):
        self._files: dict[str, FileIdentity] = {}
        self.lost: str | None = None
        for path in paths:
            self.add(path)

    def add(self, path) -> None:
        key = str(Path(path))
        if key not in self._files:
            self._files[key] = FileIdentity.of(path)

    def paths(self) -> list[str]:
        return list(self._files)

    def problem(self) -> str | None:
        """The first change found (remembered), or None."""
        if self.lost is None:
            for identity in self._files.values():
                change = identity.change()
                if change is not None:
                    self.lost = change
                    break
        return self.lost

    def check(self, what: str, remedy: str) -> None:
        """Raise SourceChanged naming the change, what depended on the file, and what to do."""
        problem = self.problem()
        if problem is not None:
            raise SourceChanged(f"{problem} after {what} was opened from it, so {what} can no longer be "
                                f"trusted. {remedy}")
