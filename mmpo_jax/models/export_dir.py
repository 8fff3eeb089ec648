"""Where an export is written: never over a file it did not write, never half-written.

An export goes to a new or empty directory, or (with `overwrite`) replaces an earlier
export that holds nothing but the files its `mmpo_export.json` lists. It is written
into a hidden sibling directory and renamed into place when complete:

    with export_directory("runs/x/export", kind="hf") as tmp:
        ...write files into tmp...
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmpo_jax import storage

from mmpo_jax.errors import UserError, first_line
from mmpo_jax.files import fsync_dir

# An export's record of itself: OUT may be reused only when it holds this file, and then
# only the files it lists are replaced (the rest of OUT is never touched).
EXPORT_MARKER = "mmpo_export.json"
_EXPORT_WRITER = "mmpo-jax export"


@dataclass
class ExportTarget:
    """Where an export goes: `path` (symlinks resolved), and the files of the earlier
    export there that it replaces (`previous`, None when `path` is absent or empty)."""

    path: Path
    previous: list[str] | None


def _shown_names(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _read_marker(out: Path) -> list[str] | None:
    """The files the export recorded in `out` wrote, or None when `out` has no record."""
    marker = out / EXPORT_MARKER
    if not marker.is_file():
        return None
    return _marker_files(marker.read_text, marker, out)


def _marker_files(read: Callable[[], str], marker: object, out: object) -> list[str]:
    """The files an export record lists (`read()` gives its text), or a UserError naming
    `marker` when it is not a record an export wrote."""
    try:
        record = json.loads(read())
        files = record["files"] if isinstance(record, dict) and record.get("written_by") == _EXPORT_WRITER else None
    except (OSError, ValueError, KeyError) as err:
        files, reason = None, f" ({err})"
    else:
        reason = ""
    # Only plain relative names inside `out`: a record naming '../x' must not make x ours.
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts
        and Path(f).name != EXPORT_MARKER for f in files
    ):
        raise UserError(f"'{marker}' is not a record mmpo-jax export wrote{reason}, so nothing in '{out}' "
                        "is known to be an export's; export to a new or empty directory")
    return sorted(set(files))


def _contents(out: Path) -> tuple[set[str], set[str]]:
    """(files, directories) under `out`, relative, symlinks as files (never followed)."""
    files: set[str] = set()
    dirs: set[str] = set()

    def fail(err: OSError) -> None:
        raise UserError(f"cannot read '{err.filename}' ({err.strerror}); export to another directory")

    for dirpath, dirnames, filenames in os.walk(out, onerror=fail):
        rel = Path(dirpath).relative_to(out)
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink():
                dirnames.remove(d)
                files.add((rel / d).as_posix())
            else:
                dirs.add((rel / d).as_posix())
        files.update((rel / f).as_posix() for f in filenames)
    return files, dirs


def check_export_target(out_dir: str | os.PathLike, *, overwrite: bool = False) -> ExportTarget:
    """Where an export to `out_dir` may go, or a UserError saying why not (nothing changed).

    Allowed: a path that does not exist, an empty directory, or (with `overwrite`) an
    earlier export, i.e. a directory holding `mmpo_export.json` and nothing but the files
    it lists. A directory with anything else in it is refused, with or without
    `overwrite`: an export never deletes or overwrites a file it did not write.
    """
    path = Path(os.path.realpath(Path(out_dir).expanduser()))
    if not path.exists():
        if path.is_symlink():  # pragma: no cover - realpath resolved it; a loop stays a link
            raise UserError(f"'{out_dir}' is a broken symlink; export to a directory path")
        return ExportTarget(path, None)
    if not path.is_dir():
        raise UserError(f"'{out_dir}' exists and is not a directory; export to a new or empty directory")
    if os.path.ismount(path):
        raise UserError(f"'{out_dir}' is a mount point, and an export is written beside its destination "
                        f"and renamed into place; export into a directory inside it, e.g. '{path / 'model'}'")
    files, dirs = _contents(path)
    if not files and not dirs:
        return ExportTarget(path, None)
    listed = _read_marker(path)
    if listed is None:
        raise UserError(f"'{out_dir}' is not empty ({_shown_names(files | dirs)}) and is not an earlier export "
                        f"(no {EXPORT_MARKER}); nothing was changed: export to a new or empty directory")
    parents = {p.as_posix() for f in listed for p in Path(f).parents if p != Path(".")}
    foreign = (files - set(listed) - {EXPORT_MARKER}) | (dirs - parents)
    if foreign:
        raise UserError(f"'{out_dir}' holds an earlier export and files it did not write "
                        f"({_shown_names(foreign)}); an export replaces only its own files: move those "
                        "out of it, or export to a new directory")
    if not overwrite:
        raise UserError(f"'{out_dir}' holds an earlier export; pass --overwrite to replace it "
                        "(only the files that export wrote), or export to a new directory")
    return ExportTarget(path, listed)


@contextlib.contextmanager
def export_directory(
    out_dir: str | os.PathLike, *, kind: str, overwrite: bool = False, about: dict[str, Any] | None = None
) -> Iterator[Path]:
    """Yields an empty temporary directory beside `out_dir` to write an export into; when
    the block ends, records what is in it (`mmpo_export.json`: `kind`, `about`, the files),
    flushes it to disk and renames it to `out_dir`, replacing an earlier export there.

    `out_dir` must pass `check_export_target` (checked before and again at the end, as it
    may have changed meanwhile). Should the block fail (an error, a full disk, Ctrl-C),
    the temporary directory is removed and `out_dir` is as it was: absent, empty, or the
    earlier export. After a hard kill a `.<name>.tmp-*` or `.<name>.old-*` directory may be
    left beside it: the next export to `out_dir` clears them (`clear_leftovers`).
    """
    clear_leftovers(Path(os.path.realpath(Path(out_dir).expanduser())))
    target = check_export_target(out_dir, overwrite=overwrite)
    final = target.path
    before = f"'{out_dir}' is as it was" if final.exists() else f"'{out_dir}' was not created"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_sibling(final, "tmp")
    except OSError as err:
        raise UserError(f"cannot create a directory beside '{out_dir}' to write the export into "
                        f"({err.strerror}: {err.filename}); export somewhere writable") from None
    try:
        yield tmp
        files = sorted(_contents(tmp)[0])
        record = {"written_by": _EXPORT_WRITER, "format_version": 1, "kind": kind, **(about or {}),
                  "files": files}
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _fsync_tree(tmp, files + [EXPORT_MARKER])
        target = check_export_target(out_dir, overwrite=overwrite)  # unchanged meanwhile?
        old = _swap_into_place(tmp, target)
    except OSError as err:  # a full disk, a permission: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        where = f": {err.filename}" if err.filename else ""
        raise UserError(f"exporting to '{out_dir}' failed ({err.strerror or err}{where}); "
                        f"nothing was changed ({before})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None and target.previous is not None:
        _remove_previous(old, target.previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clear_leftovers(final: Path) -> list[str]:
    """Removes what a killed export to `final` left beside it (`_fresh_sibling` names hold
    the writer's pid; a live writer's are left alone), and returns what was done, each said.

    A `.tmp-*` directory is a half-written export: removed. An `.old-*` one is an earlier
    export moved aside: when `final` is in place it is the replaced export, whose own files
    (those its record lists) are removed; when `final` is missing the kill came between the
    two renames, and it is renamed back, so the earlier export is never lost."""
    done: list[str] = []
    if not final.parent.is_dir():
        return done
    for entry in sorted(final.parent.glob(f".{final.name}.*-*-*")):
        kind, _, rest = entry.name[len(final.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or not entry.is_dir() or entry.is_symlink() \
                or _pid_alive(int(pid)):
            continue
        if kind == "tmp":
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed '{entry}', a half-written export left by a killed export")
        elif not final.exists():
            os.rename(entry, final)
            done.append(f"moved '{entry}' back to '{final}': a killed export had moved the earlier export aside")
        else:
            listed = _read_marker(entry)
            if listed is None:
                continue  # not an export's: not ours to remove
            _remove_previous(entry, listed)
            done.append(f"removed '{entry}', the earlier export a killed export had replaced")
    for line in done:
        warnings.warn(line)
    return done


def _fresh_sibling(final: Path, what: str) -> Path:
    """A new directory `.<name>.<what>-<pid>-<random>` beside `final` (same filesystem:
    renames are atomic), made by us alone (mkdir fails if it exists)."""
    path = final.parent / f".{final.name}.{what}-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir()
    return path


def _fsync_tree(root: Path, files: list[str]) -> None:
    """Flushes the export's files and directory to disk before it is renamed into place,
    so a power cut after the rename cannot leave truncated files under the final name."""
    for rel in files:
        path = root / rel
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(root)


def _swap_into_place(tmp: Path, target: ExportTarget) -> Path | None:
    """Renames `tmp` to `target.path`; an earlier export there is renamed aside first
    (returned, for `_remove_previous`)."""
    final = target.path
    if target.previous is None:
        # absent, or an empty directory: rename(2) replaces an empty directory atomically
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return None
    old = _fresh_sibling(final, "old")
    old.rmdir()  # only its unique name is wanted
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)  # the earlier export back where it was
        raise
    fsync_dir(final.parent)
    return old


def _remove_previous(old: Path, previous: list[str]) -> None:
    """Deletes the files an earlier export listed (and only those) from where it was renamed
    aside, then the directory if that leaves it empty; the new export is in place already,
    so a failure here is a warning."""
    try:
        for rel in previous + [EXPORT_MARKER]:
            path = old / rel
            if path.is_symlink() or path.is_file():
                path.unlink()
        for rel in sorted({p.as_posix() for r in previous for p in Path(r).parents if p != Path(".")},
                          key=lambda r: -len(Path(r).parts)):
            with contextlib.suppress(OSError):
                (old / rel).rmdir()
        old.rmdir()
    except OSError as err:  # e.g. a file added to the earlier export while this one ran
        warnings.warn(f"the earlier export was replaced, but '{old}' (where it was moved aside) could not "
                      f"be removed ({err.strerror}): it holds files the export did not write; move them "
                      "where they belong")


def check_bucket_target(url: str, *, overwrite: bool = False) -> list[str] | None:
    """`check_export_target` for a gs:// destination: nothing stored under it (None), or
    an earlier export with nothing but its files and `overwrite` (its files, returned)."""
    stored = set(storage.file_stats(url))
    if not stored:
        return None
    if EXPORT_MARKER not in stored:
        raise UserError(f"'{url}' is not empty ({_shown_names(stored)}) and is not an earlier export "
                        f"(no {EXPORT_MARKER}); nothing was changed: export to a new or empty location")
    marker = storage.join(url, EXPORT_MARKER)
    listed = _marker_files(lambda: storage.read_text(marker), marker, url)
    foreign = stored - set(listed) - {EXPORT_MARKER}
    if foreign:
        raise UserError(f"'{url}' holds an earlier export and files it did not write ({_shown_names(foreign)}); "
                        "an export replaces only its own files: move those, or export to a new location")
    if not overwrite:
        raise UserError(f"'{url}' holds an earlier export; pass --overwrite to replace it "
                        "(only the files that export wrote), or export to a new location")
    return listed


@contextlib.contextmanager
def bucket_export(url: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a local path (not yet existing) to export into, then copies that export to
    the gs:// `url`. Its `mmpo_export.json` goes last, after the old one is deleted, so a
    copy cut off midway leaves no record: a reader takes it for no export, and a second
    try refuses it unless it is cleared. Files of the earlier export that the new one
    does not have are deleted. A copy the bucket cuts off (it stops answering, refuses a
    write) is one UserError saying so and what to do."""
    check_bucket_target(url, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="mmpo-export-") as staging:
        local = Path(staging) / "export"
        yield local
        previous = check_bucket_target(url, overwrite=overwrite)  # unchanged meanwhile?
        try:
            if previous is not None:
                storage.remove_tree(storage.join(url, EXPORT_MARKER))
            sent = storage.upload(local, url, only=lambda rel: rel != EXPORT_MARKER)
            for rel in set(previous or ()) - set(sent):
                storage.remove_tree(storage.join(url, *rel.split("/")))
            storage.upload(local / EXPORT_MARKER, storage.join(url, EXPORT_MARKER))  # type: ignore[arg-type]
        except (storage.StorageUnreachable, OSError) as err:
            why = err.why if isinstance(err, storage.StorageUnreachable) else f"{type(err).__name__}: {first_line(err)}"
            raise UserError(
                f"exporting to '{url}' was cut off: {why}. What it copied there has no {EXPORT_MARKER}, so no "
                f"reader takes it for an export: remove it (gcloud storage rm -r {url}) and export again") from None
