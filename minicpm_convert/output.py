"""Outputs appear whole or not at all, and never replace what minicpm-convert did not write.

Everything is written under a recognisable temporary name beside the final path and renamed
when complete (a folder output as a whole folder; files written together, such as a GGUF's split
files and its model card, in a temporary folder, then moved in together). An interrupted or
failed run removes its temporary; one killed outright leaves a `.NAME.partial-PID` that the next
run removes.

What an output may replace (every path resolved first: symbolic links, `..`, the Hugging Face
cache's links to its blobs, so that a link to the source *is* the source):
- a file output (GGUF, JSON) given an existing folder is written inside it, under the name
  llama.cpp's converter would choose; an existing file is replaced only with --force, and never
  when it is one of the command's inputs or inside the source checkpoint; a GGUF split set's
  files and a model card beside a GGUF are replaced (with --force) only when minicpm-convert
  wrote them, and an earlier split set of ours under the same name goes with them;
- a folder output (to-llama, to-int4) may be a new or empty folder; with --force, an earlier
  export of ours (recognised by its manifest, which lists the files we wrote); never the source,
  a folder inside it or a folder that contains it, never a folder of someone else's files. Only
  the old export's files are removed; files a user added beside them are kept.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ConvertError

PARTIAL = ".partial-"
# Written into every folder export: what wrote it and which files are its own.
MANIFEST = "minicpm-convert.json"


def partial_name(final: Path, pid: int | None = None) -> Path:
    return final.parent / f".{final.name}{PARTIAL}{pid if pid is not None else os.getpid()}"


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with every symbolic link and `..` resolved (the path need not exist)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass
class Protected:
    """What no output may replace: the source checkpoint (its folder and the files its entries
    resolve to, e.g. the Hub cache's blobs) and the command's other inputs."""

    folders: list[Path] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)

    @classmethod
    def of(cls, source_folders: Iterable[Path] = (), inputs: Iterable[Path] = ()) -> "Protected":
        folders = [resolved(f) for f in source_folders]
        files: set[Path] = set()
        for path in [*folders, *(resolved(i) for i in inputs)]:
            if path.is_dir():  # an input folder: its files (a folder may hold new outputs)
                files.update(resolved(p) for p in path.rglob("*") if not p.is_dir())
            else:
                files.add(path)
        return cls(folders, files)

    def owner(self, path: Path) -> str | None:
        """Which protected thing `path` (resolved) is or lies in, else None."""
        if path in self.files:
            return "an input of this command"
        for folder in self.folders:
            if path == folder:
                return "the source checkpoint"
            if folder in path.parents:
                return f"inside the source checkpoint {folder}"
        return None

    def contains_protected(self, folder: Path) -> str | None:
        for f in self.folders:
            if _inside(f, folder):
                return f"it contains the source checkpoint {f}"
        for p in self.files:
            if folder in p.parents:
                return f"it contains {p}, an input of this command"
        return None


def output_path(out: str | os.PathLike, default_name: Callable[[], str]) -> Path:
    """The file a command writes for OUT: inside OUT when OUT is a folder (llama.cpp's converter
    does the same), under `default_name()`."""
    given = Path(os.path.expanduser(os.fspath(out)))
    return resolved(given / default_name() if given.is_dir() else given)


def _check_replace(final: Path, force: bool, protected: Protected, ours: Callable[[Path], bool] | None) -> None:
    """Whether `final` may be written: absent, or replaceable (--force, not protected, and when
    `ours` is given, a file it recognises as written by minicpm-convert)."""
    if final.is_dir():
        raise ConvertError(f"{final}: is a folder")
    if final.exists() or final.is_symlink():
        owner = protected.owner(final)
        if owner:
            raise ConvertError(f"{final}: refusing to replace it: it is {owner}")
        if not force:
            raise ConvertError(f"{final}: already exists (use --force to overwrite)")
        if ours is not None and not ours(final):
            raise ConvertError(f"{final}: was not written by minicpm-convert; it is never replaced, even with "
                               "--force (move it away)")


def file_output(out: str | os.PathLike, default_name: Callable[[], str], force: bool,
                protected: Protected) -> Path:
    """The file a command will write for OUT, checked against what it would replace."""
    final = output_path(out, default_name)
    _check_replace(final, force, protected, None)
    return final


@dataclass(frozen=True)
class FileSet:
    """Files a command writes together (a GGUF, its split files, its model card): all of them
    appear, or none. The first is the one a reader opens (llama.cpp a split set's first file)."""

    files: tuple[Path, ...]
    stale: tuple[Path, ...] = ()  # an earlier set of ours the new one supersedes: removed with the swap
    name: Path | None = None  # what the temporaries are named after (default: the first file)


def file_set(files: Iterable[tuple[Path, Callable[[Path], bool] | None]], force: bool, protected: Protected,
             stale: Iterable[Path] = (), name: Path | None = None) -> FileSet:
    """The files (final path, and `ours` when --force may replace only a file minicpm-convert
    wrote there, None for any file) checked as `file_output` checks one; `stale`: files of an
    earlier set of ours that the new one makes obsolete (removed once it is in place); `name`:
    the output's name whatever the set (a split GGUF's unsplit name), for its temporaries."""
    files = list(files)
    for path, ours in files:
        _check_replace(path, force, protected, ours)
    stale = [p for p in stale if not protected.owner(p)]
    if stale and not force:
        raise ConvertError(f"{stale[0]}: an earlier export under this name (use --force to replace it)")
    return FileSet(tuple(p for p, _ in files), tuple(stale), name)


@dataclass(frozen=True)
class FolderTarget:
    """A folder output and, when it replaces an earlier export, that export's own files."""

    path: Path
    old_files: frozenset[str] = frozenset()  # names listed in the old export's manifest
    replaces: bool = False

    def keeps(self, name: str) -> bool:
        """Whether the folder holds a file `name` a user added to an earlier export: it is kept, so
        the new export must not bring one of its own."""
        return self.replaces and name not in self.old_files and (self.path / name).exists()


def read_manifest(folder: Path) -> list[str] | None:
    """The files an export of ours lists as its own, or None if `folder` holds no manifest of ours."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("tool") == "minicpm-convert" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f for f in files):
        return None
    return files


def write_manifest(folder: Path, **provenance) -> None:
    """Record the export's own files (every file now in `folder`, the manifest included)."""
    from . import __version__

    files = sorted({p.name for p in folder.iterdir()} | {MANIFEST})
    data = {"tool": "minicpm-convert", "version": __version__, **provenance, "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, leaving out temporaries of our own runs."""
    return sorted(p for p in folder.iterdir() if not (p.name.startswith(".") and PARTIAL in p.name))


def folder_output(out: str | os.PathLike, force: bool, protected: Protected) -> FolderTarget:
    """The folder a command will write for OUT, checked against what it would replace."""
    final = resolved(out)
    owner = protected.owner(final)
    if owner:
        raise ConvertError(f"{final}: refusing to write an export there: it is {owner}")
    holds = protected.contains_protected(final)
    if holds:
        raise ConvertError(f"{final}: refusing to write an export there: {holds}")
    if not final.exists():
        return FolderTarget(final)
    if not final.is_dir():
        raise ConvertError(f"{final}: is a file, not a folder (choose a new folder for the export)")
    entries = _entries(final)
    if not entries:
        return FolderTarget(final, replaces=True)
    ours = read_manifest(final)
    if ours is None:
        raise ConvertError(f"{final}: holds files minicpm-convert did not write (e.g. '{entries[0].name}'); "
                           "it is never replaced, even with --force: choose a new or empty folder")
    if not force:
        raise ConvertError(f"{final}: already exists (an earlier export; use --force to replace it)")
    return FolderTarget(final, frozenset(ours), replaces=True)


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


def _mkdir_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"{final.parent}: cannot create output folder ({exc.strerror})") from None


@contextmanager
def _writing(final: Path, folder: bool) -> Iterator[Path]:
    """A fresh temporary beside `final`; removed on any failure, translated to one line."""
    _mkdir_parent(final)
    clean_stale_partials(final)
    tmp = partial_name(final)
    _remove(tmp)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise ConvertError(f"{final}: no space left on device; nothing was written") from None
        where = exc.filename or final
        raise ConvertError(f"{where}: cannot write ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path; it becomes `final` (checked by `file_output`) when the block completes."""
    with _writing(final, folder=False) as tmp:
        yield tmp
        os.replace(tmp, final)


@contextmanager
def atomic_folder(target: FolderTarget) -> Iterator[Path]:
    """Yield a temporary folder; it becomes `target.path` when the block completes.

    Replacing an earlier export: the old folder moves aside whole only once the new one is
    complete, the new one takes its place, then the files a user added to the old folder move
    into the new one and what is left (the old export's own files) is deleted. A crash in
    between leaves the old folder as `.NAME.old-PID`, never deleted automatically."""
    final = target.path
    with _writing(final, folder=True) as tmp:
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
            return
        kept = [p for p in _entries(final) if p.name not in target.old_files]
        clash = [p.name for p in kept if (tmp / p.name).exists()]
        if clash:
            raise ConvertError(f"{final / clash[0]}: was not written by minicpm-convert, and the new export has "
                               "a file of that name; move it away and run again (the old export is unchanged)")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        for p in kept:
            os.replace(old / p.name, final / p.name)
        _remove(old)


@contextmanager
def atomic_files(target: FileSet) -> Iterator[Path]:
    """Yield a temporary folder; the set's files, written into it under their final names, take
    their places when the block completes. What they replace (and the set's stale files) first
    moves aside, so that an old first file never meets new split files; the new files move in,
    the first one last; then what was moved aside is deleted. A failure in between puts
    everything back; a crash leaves the old files in `.NAME.old-PID`, never deleted automatically."""
    first = target.files[0]
    name = target.name or first
    with _writing(name, folder=True) as tmp:
        yield tmp
        old = name.parent / f".{name.name}.old-{os.getpid()}"
        aside = [p for p in (*target.files, *target.stale) if p.exists() or p.is_symlink()]
        placed: list[Path] = []
        try:
            if aside:
                old.mkdir()
                for p in aside:
                    os.replace(p, old / p.name)
            for p in reversed(target.files):
                os.replace(tmp / p.name, p)
                placed.append(p)
        except BaseException:
            for p in placed:
                os.replace(p, tmp / p.name)
            for p in aside:
                if (old / p.name).exists() or (old / p.name).is_symlink():
                    os.replace(old / p.name, p)
            _remove(old)
            raise
        _remove(old)
        tmp.rmdir()


def write_json_file(final: Path, payload: dict) -> None:
    """A JSON file written atomically (`final` checked by `file_output`)."""
    with atomic_file(final) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
