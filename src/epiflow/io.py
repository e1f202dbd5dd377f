"""Small I/O helpers shared by every stage: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: on any exception the temporary file (or folder)
    is removed and the exception propagates. A folder the block makes at the temporary path replaces
    an existing folder at ``path`` (:func:`replace_folder`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the writer creates it (some libraries refuse to overwrite)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_dir():
            replace_folder(tmp_path, path)
        else:
            os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()
        raise


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the folder ``new`` onto ``path``, replacing the folder there (a rename alone refuses a
    folder that is not empty): the former folder is moved aside, ``new`` renamed in, the former one
    removed; put back if the rename fails, so that no ``.NAME.XXXXXXXX.old`` is left behind. An
    existing file at ``path`` is refused (:class:`~epiflow.errors.ConfigError`), never replaced."""
    import shutil

    from .errors import ConfigError

    new, path = Path(new), Path(path)
    if not (path.exists() or path.is_symlink()):
        os.replace(new, path)
        return
    if not path.is_dir():
        raise ConfigError(
            "exists as a file, but the output is a folder",
            path=str(path),
            fix="give a folder path (a new or an existing folder), or remove the file",
        )
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)  # the former folder back
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield ``folder``; if the block raises, remove ``folder`` (and the parents of it that did not
    exist before the block) where they are still empty, so that a run that fails before writing
    anything leaves no empty output folder behind. A folder that existed before is never removed."""
    folder = Path(folder)
    new = []  # the folders the block may create, innermost first
    p = folder
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        new.append(p)
        p = p.parent
    try:
        yield folder
    except BaseException:
        for d in new:
            try:
                d.rmdir()  # only an empty folder
            except OSError:
                break
        raise


def folder_mode() -> int:
    """The mode a plain ``mkdir`` gives a new folder under the current umask (``0o777 & ~umask``).

    A folder made with :func:`tempfile.mkdtemp` (built under a temporary name, then renamed onto the
    output) is 0700; chmod it to this so that the output gets the mode of every other output.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def check_output_kind(
    path: str | os.PathLike, kind: str | None, what: str = "output", *, field: str | None = None, fix: str | None = None
) -> None:
    """Refuse an existing ``path`` of the other kind than the output ``kind`` ("file" or "folder";
    None: either): a folder where a file is written, a file (or a dangling link) where a folder is.
    ``fix``: the advice for the folder case (default: a new or an existing folder)."""
    from .errors import ConfigError

    path = Path(path)
    if kind == "file" and path.is_dir():
        raise ConfigError(
            f"exists as a folder, but the {what} must be a file",
            path=str(path),
            field=field,
            fix=f"give a file path (e.g. {path / 'NAME'}), or remove the folder",
        )
    if kind == "folder" and (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ConfigError(
            f"exists as a file, but the {what} must be a folder",
            path=str(path),
            field=field,
            fix=fix or "give a folder path (a new or an existing folder), or remove the file",
        )


def check_writable(path: str | os.PathLike, what: str = "output", kind: str | None = None) -> Path:
    """Raise :class:`~epiflow.errors.EpiflowError` naming ``path`` unless it can be written.

    Called before any work (the CLI does it for every verb's ``--out``), so that an unwritable
    output fails in a second with a clear message instead of a ``PermissionError`` traceback after
    the work. ``path`` may be a file or a folder, existing or not; nothing is created: a probe file
    is made and removed in ``path`` (an existing folder) or in its nearest existing ancestor.
    ``kind`` ("file" or "folder"; None: either) is what the output is: an existing path of the
    other kind (a folder where a file is written, a file where a folder is) is refused.
    """
    from .errors import EpiflowError

    path = Path(path)
    check_output_kind(path, kind, what)
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise EpiflowError(
                f"cannot write the {what}: {probe_dir} is a file, not a folder",
                path=str(path),
                fix="choose another output path",
            )
        fd, probe = tempfile.mkstemp(prefix=".epiflow-write-test.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EpiflowError(
            f"cannot write the {what} ({exc.strerror or exc} in {probe_dir})",
            path=str(path),
            fix="choose a folder you can write to, or fix its permissions",
        ) from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
