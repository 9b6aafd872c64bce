"""Safe output paths and atomic writes: nothing at an output path is lost, nothing is left half-written.

The rules every dosegym writer follows:

- A **file** output replaces only a regular file (a symbolic link to one is replaced by the
  new file; its target is untouched). An existing folder, device, FIFO, socket or other
  special file at the path is refused with ``DataError``, and so is a path under a regular
  file. Where writing into a folder is the documented meaning (``dosegym score --out DIR``),
  the caller names the file (``check_output_path(path, in_folder=NAME)``).
- A **folder** output that a writer makes as a unit (a ``predict`` folder, a case folder, a
  checkpoint, a phantom set, a DICOM set) goes to a new or empty folder, or into an earlier
  output of the same writer: a folder holding :data:`MARKER`, a JSON file
  ``{"writer": NAME, "files": [relative paths]}`` the writer leaves there. In that folder only
  the files the marker lists are replaced or removed (so a new output never mixes with the
  stale files of an earlier one); every other file stays, and a file of the new output that
  would replace an unlisted file is refused. No folder is removed, except a subfolder that
  the writer's own stale files leave empty.
- Everything is written under a temporary name first and renamed into place; a write that
  fails (full disk, no permission) raises ``DataError`` naming the path and leaves nothing
  behind.
- JSON outputs are strict JSON (:func:`json_text`): never a bare ``NaN`` or ``Infinity``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from dosegym.errors import DataError

MARKER = ".dosegym-output.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, *, folder: bool) -> None:
    """Give a ``mkstemp``/``mkdtemp`` path (created 0600/0700) the mode a plain ``open``/``mkdir``
    would have given it under the current umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_location(dest: Path) -> None:
    """Every existing ancestor of ``dest`` is a folder, and the nearest one is writable."""
    for parent in (dest.parent, *dest.parent.parents):
        if os.path.lexists(parent) and not parent.exists():
            raise DataError(f"{dest}: cannot be written: {parent} is a broken symbolic link")
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise DataError(f"{dest}: cannot be written: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataError(f"{dest}: cannot be written: no permission to write in {parent}")
        return


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` when it is a valid one (relative file paths only), else None."""
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("writer"), str):
        return None
    files = doc.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    for f in files:
        p = PurePosixPath(f)
        if not f or p.is_absolute() or ".." in p.parts or p.as_posix() != f or f == MARKER:
            return None
    return doc


def _mode(dest: Path, kind: str, valid: str) -> int | None:
    """``dest``'s mode (links followed), or None when nothing is there; ``DataError`` for a
    broken link (``valid``: what to give instead) or a path that cannot be checked."""
    try:
        return os.stat(dest).st_mode
    except FileNotFoundError:
        if os.path.islink(dest):
            raise DataError(f"{dest}: is a broken symbolic link; give {valid}") from None
        return None
    except OSError as exc:
        raise DataError(f"{dest}: cannot be checked as an output {kind} ({exc.strerror})") from exc


def _check_folder(dest: Path, writer: str, skip: Path | None = None) -> None:
    """``dest`` is missing, empty (but for ``skip``) or an earlier output of ``writer``."""
    mode = _mode(dest, "folder", "a new or empty folder")
    if mode is None:
        return
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else _kind(mode)
        raise DataError(
            f"{dest}: exists and is {what}; the {writer} output is a folder: give a new or empty folder"
        )
    try:
        with os.scandir(dest) as entries:
            empty = all(Path(e.path) == skip for e in entries)
    except OSError as exc:
        raise DataError(f"{dest}: cannot list the output folder ({exc.strerror})") from exc
    if empty:
        return
    marker = _read_marker(dest)
    if marker is None or marker["writer"] != writer:
        why = f"it holds no valid {MARKER}" if marker is None else f"its {MARKER} names {marker['writer']!r}"
        raise DataError(
            f"{dest}: exists, is not empty and is not an earlier {writer} output ({why}); refusing to "
            "write into it: give a new or empty folder"
        )


def _check_file(dest: Path) -> None:
    mode = _mode(dest, "file", "a new file path")
    if mode is None:
        return
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{dest}: exists and is {_kind(mode)}; dosegym replaces only a regular file: give a new "
            "file path or an existing regular file"
        )


def check_output_path(
    path: str | os.PathLike, *, writer: str | None = None, in_folder: str | None = None
) -> Path:
    """Check, before any work, that an output may be written at ``path``; return the path to write.

    ``writer`` given: ``path`` is a folder output of that writer (see module docstring).
    Otherwise ``path`` is a file; with ``in_folder``, an existing folder at ``path`` means the
    file ``path / in_folder``. Raises ``DataError`` naming the path and what would be valid.
    """
    dest = Path(path)
    _check_location(dest)
    if writer is not None:
        _check_folder(dest, writer)
        return dest
    if in_folder is not None and dest.is_dir():
        dest = dest / in_folder
    _check_file(dest)
    return dest


def _write_failed(dest: Path, exc: OSError) -> DataError:
    reason = exc.strerror or str(exc)
    name = str(exc.filename or "")
    where = f" ({name})" if name and ".partial" not in name and name != str(dest) else ""
    return DataError(f"{dest}: could not be written: {reason}{where}; nothing was written there")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success rename it onto ``path``.

    ``path`` must be new or a regular file (checked first, see :func:`check_output_path`).
    On error the temporary is removed and ``path`` untouched; an ``OSError`` (full disk, no
    permission) becomes a ``DataError`` naming ``path``.
    """
    dest = check_output_path(path)
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        tmp.unlink()
        yield tmp
        _check_file(dest)
        os.replace(tmp, dest)
    except OSError as exc:
        raise _write_failed(dest, exc) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _files(folder: Path) -> list[str]:
    """Relative posix paths of every non-folder entry under ``folder`` (links not followed)."""
    out = []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for name in names + [d for d in dirs if (base / d).is_symlink()]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def _put_marker(folder: Path, writer: str, files: list[str]) -> None:
    text = json_text({"writer": writer, "files": sorted(files)})
    fd, tmp_name = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".partial", dir=folder)
    try:
        _usual_mode(Path(tmp_name), folder=False)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp_name, folder / MARKER)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _merge(tmp: Path, dest: Path, writer: str) -> None:
    """Move the new output ``tmp`` into ``dest`` (empty or an earlier output of ``writer``)."""
    _check_folder(dest, writer, skip=tmp)
    marker = _read_marker(dest)
    old = set(marker["files"]) if marker else set()
    new = _files(tmp)
    for f in new:
        target = dest / f
        if os.path.lexists(target) and (f not in old or (target.is_dir() and not target.is_symlink())):
            raise DataError(
                f"{target}: exists and was not written by an earlier {writer}; refusing to replace it "
                f"(move it away, or give another folder)"
            )
    _put_marker(dest, writer, sorted(old | set(new)))  # a crash while moving leaves every file listed
    for f in new:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / f, dest / f)
    for f in sorted(old - set(new)):
        target = dest / f
        if target.is_symlink() or target.is_file():
            target.unlink()
        for parent in target.parents:  # folders the stale files leave empty
            if parent == dest:
                break
            try:
                parent.rmdir()
            except OSError:
                break
    _put_marker(dest, writer, new)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, writer: str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success its files become the folder output ``path``.

    ``path`` must be new, an empty folder or an earlier output of ``writer`` (see module
    docstring; checked first). A new ``path`` appears at once (one rename); an existing one
    keeps the files the marker does not list. On error nothing at ``path`` changes.
    """
    dest = check_output_path(path, writer=writer)
    tmp: Path | None = None
    try:
        exists = dest.is_dir()
        base = dest if exists else dest.parent
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=base))
        _usual_mode(tmp, folder=True)
        yield tmp
        if exists or os.path.lexists(dest):
            _merge(tmp, dest, writer)
        else:
            _put_marker(tmp, writer, _files(tmp))
            os.replace(tmp, dest)
    except OSError as exc:
        raise _write_failed(dest, exc) from exc
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


_SPELLED = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _finite(obj: Any, spell: bool) -> Any:
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return _SPELLED.get(obj, "NaN") if spell else None
    if isinstance(obj, dict):
        return {k: _finite(v, spell) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, spell) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2, *, spell_nonfinite: bool = False, **kwargs: Any) -> str:
    """Strict JSON text (RFC 8259) ending in a newline. NaN and infinities become ``null``, or
    with ``spell_nonfinite`` the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (which
    pydantic reads back into floats)."""
    return json.dumps(_finite(obj, spell_nonfinite), indent=indent, allow_nan=False, **kwargs) + "\n"
