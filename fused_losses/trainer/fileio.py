"""Files the trainer writes, whole or not at all: written beside their place, then renamed
into it, so a kill or Ctrl-C leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None], *, sync: bool = False) -> None:
    """``write(tmp)`` fills a temporary file (or directory) beside ``path``, which then takes
    its place; on any error or interrupt the temporary is removed. ``sync``: flush it to disk
    first (checkpoints: the rename must not reach the disk before the data)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        if sync and tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # a directory cannot be renamed over another
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))
