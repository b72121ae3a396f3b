"""Where a file's bytes live: one file per id in the files directory
(`Settings.files_dir`), which every gateway and worker shares.

Everything here but `path` does blocking I/O: callers run it with `asyncio.to_thread`.
Bytes are written under a temporary name in the same directory and renamed into place
(`os.replace`, atomic) only once complete and synced, so a crash or a refused upload
never leaves a partial file under a real id; `sweep_temps` clears what a crash left.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from app.config import Settings

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
_TEMP_PREFIX = ".tmp-"  # never matches FILE_ID, so a temp file is never served


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


class TempFile:
    """Bytes being written; `commit` puts them under an id, leaving (or `discard`)
    removes them. A context manager that discards unless committed."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{_TEMP_PREFIX}{secrets.token_hex(12)}"
        self.size = 0
        self._fh: BinaryIO | None = self.path.open("xb")
        self._committed = False

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "write after finish"
        self._fh.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush to disk and close (the bytes can then be read back by path)."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()

    def commit(self, final: Path) -> None:
        self.finish()
        os.replace(self.path, final)
        self._committed = True
        _sync_directory(final.parent)  # the rename itself survives a power cut

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self._committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> TempFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStorage:
        return cls(settings.files_dir)

    def path(self, file_id: str) -> Path:
        """Where the bytes of `file_id` live. No I/O. Only well-formed ids are accepted
        (ValueError otherwise), so no id can name a path outside the directory."""
        if not is_file_id(file_id):
            raise ValueError(f"not a file id: {file_id[:64]!r}")
        return self.root / file_id

    def temp(self) -> TempFile:
        """A new temporary file in the directory (made if missing)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return TempFile(self.root)

    def commit(self, temp: TempFile, file_id: str) -> None:
        temp.commit(self.path(file_id))

    def write(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Store `chunks` as `file_id` (replacing it if present); the bytes written."""
        final = self.path(file_id)
        with self.temp() as temp:
            for chunk in chunks:
                temp.write(chunk)
            temp.commit(final)
            return temp.size

    def open(self, file_id: str) -> BinaryIO:
        """The bytes of `file_id` for reading; FileNotFoundError when there are none.
        An open file stays readable even if it is deleted meanwhile."""
        return self.path(file_id).open("rb")

    def delete(self, file_id: str) -> bool:
        """Remove the bytes of `file_id`; False if there were none."""
        try:
            self.path(file_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def sweep_temps(self, older_than_s: float) -> int:
        """Remove temporary files older than `older_than_s` (left by a crash: a live
        upload keeps writing to its own); the number removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if entry.name.startswith(_TEMP_PREFIX) and entry.stat().st_mtime < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed


def _sync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
