"""Outputs appear whole or not at all.

Everything is written under a recognisable temporary name beside the final path and renamed
when complete (a folder output as a whole folder). An interrupted or failed run removes its
temporary; one killed outright leaves a `.NAME.partial-PID` that the next run removes.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConvertError

PARTIAL = ".partial-"


def partial_name(final: Path, pid: int | None = None) -> Path:
    return final.parent / f".{final.name}{PARTIAL}{pid if pid is not None else os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_stale_partials(final: Path) -> None:
    """Remove temporaries left by killed runs for this output (never a live run's)."""
    prefix = f".{final.name}{PARTIAL}"
    if not final.parent.is_dir():
        return
    for p in final.parent.iterdir():
        if p.name.startswith(prefix):
            tail = p.name[len(prefix):]
            if tail.isdigit() and not _pid_alive(int(tail)):
                _remove(p)


def check_output(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise ConvertError(f"{final}: already exists (use --force to overwrite)")


@contextmanager
def atomic_output(final: Path, *, force: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `final` only if the block completes."""
    final = Path(final)
    check_output(final, force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"{final.parent}: cannot create output folder ({exc.strerror})") from None
    clean_stale_partials(final)
    tmp = partial_name(final)
    _remove(tmp)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if final.exists():
            # --force: move the old output aside first so a failure here loses nothing.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise ConvertError(f"{final}: no space left on device; nothing was written") from None
        where = exc.filename or final
        raise ConvertError(f"{where}: cannot write ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise
