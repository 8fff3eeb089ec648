"""Locations that are local paths or Cloud Storage URLs (`gs://bucket/path`).

A TPU slice's hosts share no disk, so a run's checkpoints, its model and its data can
live in a bucket. This module is the one place that knows the difference: every other
module passes a location (a `Path`, or a `str` that may be a URL) to the functions
here. Orbax writes checkpoint arrays through tensorstore, which reaches GCS itself;
everything else goes through `gcsfs` (fsspec).

Reading a model, a tokenizer or a data file from a bucket copies it into the local
cache first (`local_copy`), because safetensors, GGUF and tokenizers read local files;
a file whose size and generation are unchanged since the last copy is not fetched
again. The cache is `$MMPO_JAX_CACHE` (default `~/.cache/mmpo-jax`).

The emulator of the tests, and any other endpoint: gcsfs reads `STORAGE_EMULATOR_HOST`,
tensorstore reads `TENSORSTORE_GCS_HTTP_URL` once per process (and needs
`GOOGLE_AUTH_TOKEN_FOR_TESTING` to skip credential discovery): set all three before the
first access.

A bucket that stops answering. Every request of this module's client retries a lost
connection or a server error (5xx, 429) with growing pauses for at most `timeout_s()`
seconds (`train.storage_timeout_s`), then the operation fails with `StorageUnreachable`,
one line naming the bucket. While the endpoint has never answered in this process (a
wrong endpoint, no network: what a command meets at its start), a failed connection is
not retried at all. After one request has given up, later ones are tried once until one
succeeds, so that a run that lost its bucket stops at once rather than after a timeout
for each of its last writes. Orbax writes a step's arrays through tensorstore, whose
retries `tensorstore_retries` bounds alike, and its metadata through `etils.epath`,
whose gcsfs `bound_fsspec_gcs` makes this client; `mmpo_jax.train.checkpoint` bounds the
wait for them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Union

from mmpo_jax.errors import UserError, first_line
from mmpo_jax.files import write_bytes_atomic

GCS_PREFIX = "gs://"
# A location: a local path, or a str that is a local path or a gs:// URL.
Location = Union[str, os.PathLike]
_STAMP_FILE = ".mmpo_source.json"  # beside a local copy: what it was copied from


def is_url(location: Location) -> bool:
    """Whether `location` names an object store (`gs://...`) rather than a local path."""
    return isinstance(location, str) and "://" in location


def check_url(location: Location, key: str) -> None:
    """A UserError naming `key` for a URL scheme other than gs:// or a URL without a bucket."""
    if not is_url(location):
        return
    text = str(location)
    if not text.startswith(GCS_PREFIX):
        raise UserError(f"{key}={text!r}: only gs:// URLs (Cloud Storage) and local paths are supported")
    if not text[len(GCS_PREFIX):].split("/", 1)[0]:
        raise UserError(f"{key}={text!r}: name the bucket, e.g. gs://my-bucket/runs/x")


DEFAULT_TIMEOUT_S = 300.0
_timeout_s = DEFAULT_TIMEOUT_S
# Whether the endpoint answered this process, and why the last request that gave up did
# (None once one succeeds): see the module docstring.
_answered = False
_outage: str | None = None
# The longest a connection may take to open; a request that then receives nothing for
# `timeout_s()` is a lost connection too (retried): a bucket behind a dead network accepts
# no connection, or never answers one.
_CONNECT_TIMEOUT_S = 30.0


class StorageUnreachable(UserError):
    """A bucket that did not answer (no connection, or only server errors) for `timeout_s()`
    seconds, or at all while the endpoint never answered this process."""

    def __init__(self, bucket: str, why: str) -> None:
        super().__init__(f"{why}: check the network and the credentials (STORAGE_EMULATOR_HOST for an emulator), "
                         "then run the same command again")
        self.bucket = bucket
        self.why = why  # what failed, without the advice: for a caller that says what to do itself


def set_timeout(seconds: float) -> None:
    """How long one request to a bucket keeps retrying (`train.storage_timeout_s`)."""
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"a storage timeout must be > 0 seconds, not {seconds}")
    _timeout_s = float(seconds)


def timeout_s() -> float:
    return _timeout_s


def outage() -> str | None:
    """Why this process's requests to its buckets last gave up, or None when they answer."""
    return _outage


def mark_outage(why: str) -> None:
    """Records that a bucket stopped answering a client other than this module's (orbax's
    writes), so that the requests that follow are tried once, not for a whole timeout."""
    global _outage
    _outage = why


def bucket_of(location: Location) -> str:
    """The bucket of a gs:// URL."""
    return _key(str(location)).split("/", 1)[0]


def tensorstore_retries(seconds: float) -> dict[str, Any]:
    """tensorstore's `gcs_request_retries` context resource for retrying a request for about
    `seconds` (its default, 32 retries of up to 32 s, keeps a lost bucket's save going for a
    quarter of an hour)."""
    initial = min(1.0, seconds / 8)
    longest = min(32.0, max(initial, seconds / 4))
    retries, total, delay = 0, 0.0, initial
    while total < seconds:
        retries, total, delay = retries + 1, total + delay, min(delay * 2, longest)
    return {"max_retries": retries, "initial_delay": f"{initial:g}s", "max_delay": f"{longest:g}s"}


# tensorstore's status once its retries of a GCS request ran out (a ValueError's text)
_TENSORSTORE_UNREACHABLE = re.compile(r"^(UNAVAILABLE|DEADLINE_EXCEEDED):|retry attempts failed|CURL error")


def is_unreachable_error(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from or during, says that a bucket did not
    answer: a lost connection, a timeout, a server error, or tensorstore's status once its
    retries ran out."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, StorageUnreachable) or _retriable(err):
            return True
        if isinstance(err, ValueError) and _TENSORSTORE_UNREACHABLE.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _retriable(err: BaseException) -> bool:
    """An error a later try of the same request may not meet: no connection, no answer in
    time, a server error."""
    # the command line imports this module, and gcsfs takes ~0.5 s to import:
    # lazy: gcsfs, aiohttp, fsspec (every import of them here) load for gs:// locations only
    import aiohttp
    from gcsfs.retry import HttpError, is_retriable

    if isinstance(err, HttpError):
        return bool(is_retriable(err))
    return isinstance(err, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)) or bool(is_retriable(err))


def _no_connection(err: BaseException) -> bool:
    import aiohttp  # lazy: gs:// only (see `_retriable`)

    return isinstance(err, (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, asyncio.TimeoutError,
                            ConnectionError))


@functools.lru_cache(maxsize=1)
def _gcs() -> Any:
    return _bounded_filesystem()()


@functools.lru_cache(maxsize=1)
def bound_fsspec_gcs() -> None:
    """Makes fsspec's gs:// filesystem, the one orbax's `etils.epath` opens for a step's
    metadata and commit marker, this module's: gcsfs's own retries hold a save in the main
    thread for half a minute per request whatever the timeout, and its extended filesystem
    asks the control plane for each bucket's layout on every file it opens (for want of an
    answer, the emulator's case and most service accounts'), resolving credentials on
    the event loop that every gs:// request of the process waits on."""
    import fsspec  # type: ignore[import-untyped]  # lazy: gs:// only (see `_retriable`)

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, _bounded_filesystem(), clobber=True)
    try:  # etils keeps the filesystem it opened: one opened before now would keep gcsfs's retries
        from etils.epath import backend  # lazy: gs:// only, and etils may lack it (below)

        backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    except (ImportError, AttributeError):  # pragma: no cover - another etils
        pass


@functools.lru_cache(maxsize=1)
def _bounded_filesystem() -> Any:
    """gcsfs's filesystem class with this module's retries (see the module docstring) in
    place of gcsfs's: 6 tries over about 30 s whatever the timeout, each failure logged
    with a traceback."""
    try:
        # lazy: gs:// only (see `_retriable`)
        import aiohttp
        # the plain filesystem: the extended one asks the control plane for the bucket's
        # layout, which emulators and most service accounts cannot answer
        from gcsfs.core import GCSFileSystem
    except ImportError as err:  # pragma: no cover - a runtime dependency
        raise UserError("gs:// locations need the gcsfs package: pip install gcsfs") from err
    _one_line_storage_errors()

    class BoundedGCSFileSystem(GCSFileSystem):
        @property
        def requests_timeout(self) -> Any:
            # read at each request (`set_timeout` may come after the client); no total: a
            # large file may take longer than any timeout to copy
            return aiohttp.ClientTimeout(total=None, sock_connect=min(_CONNECT_TIMEOUT_S, _timeout_s),
                                         sock_read=_timeout_s)

        @requests_timeout.setter
        def requests_timeout(self, value: Any) -> None:
            pass  # gcsfs's constructor sets it

        async def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            found = re.search(r"/b/([^/?]+)", self._format_path(path, args))
            return await _retrying(found.group(1) if found else "?", self._location,
                                   _undecorated(GCSFileSystem._request), self, method, path, *args, **kwargs)

        async def _get_file_request(self, rpath: str, *args: Any, **kwargs: Any) -> Any:
            return await _retrying(self.split_path(rpath)[0], self._location,
                                   _undecorated(GCSFileSystem._get_file_request), self, rpath, *args, **kwargs)

        async def _get_file_concurrent(self, rpath: str, *args: Any, **kwargs: Any) -> Any:
            return await _retrying(self.split_path(rpath)[0], self._location,
                                   _undecorated(GCSFileSystem._get_file_concurrent), self, rpath, *args, **kwargs)

    return BoundedGCSFileSystem


async def _retrying(bucket: str, endpoint: str, request: Callable[..., Awaitable[Any]], *args: Any,
                    **kwargs: Any) -> Any:
    """`await request(*args, **kwargs)`, retried as the module docstring says."""
    global _answered, _outage
    deadline = time.monotonic() + _timeout_s
    pause = 1.0
    while True:
        try:
            answer = await request(*args, **kwargs)
        except Exception as err:
            if not _retriable(err):
                raise
            left = deadline - time.monotonic()
            never = not _answered and _no_connection(err)
            if never or _outage is not None or left <= 0:
                why = f"{type(err).__name__}: {first_line(err)}"
                _outage = why
                spent = "" if never or left > 0 else f" for train.storage_timeout_s={_timeout_s:g} s"
                raise StorageUnreachable(bucket, f"cannot reach the bucket '{bucket}' at {endpoint}{spent} ({why})") \
                    from None
            await asyncio.sleep(min(left, pause * (1 + random.random() / 2)))
            pause = min(pause * 2, 32.0)
            continue
        _answered, _outage = True, None
        return answer


def _undecorated(method: Any) -> Any:
    """A gcsfs request method without gcsfs's own retries (`decorator` keeps the original)."""
    return getattr(method, "__wrapped__", method)


class _OneLine(logging.Filter):
    """The storage errors that libraries' threads log with their tracebacks (orbax's writes,
    gcsfs's retries; a dozen for one lost bucket) are one line, the first's, and none once
    a request gave up (`outage`): the caller reports the error itself."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and is_unreachable_error(record.exc_info[1])):
            return True
        if _outage is not None or self.seen:
            return False
        self.seen = True
        record.exc_info, record.exc_text = None, None
        record.msg, record.args = record.getMessage().splitlines()[0], ()
        return True


@functools.lru_cache(maxsize=1)
def _one_line_storage_errors() -> None:
    quiet = _OneLine()
    for name in ("absl", "gcsfs"):
        logging.getLogger(name).addFilter(quiet)


def _key(url: str) -> str:
    """`bucket/path` of `gs://bucket/path/`, the form gcsfs takes."""
    return url[len(GCS_PREFIX):].rstrip("/")


def join(base: Location, *parts: str) -> Location:
    """`base / part / ...`: a URL stays a `str`, a local path becomes a `Path`."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def name(location: Location) -> str:
    """The last component of `location`."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def absolute(location: Location) -> Location:
    """A local path made absolute (`~` expanded); a URL as it is."""
    return location if is_url(location) else Path(location).expanduser().absolute()


def exists(location: Location) -> bool:
    if is_url(location):
        return bool(_gcs().exists(_key(str(location))))
    return Path(location).exists()


def is_dir(location: Location) -> bool:
    """A local directory, or a URL with at least one object under it."""
    if is_url(location):
        fs = _gcs()
        fs.invalidate_cache(_key(str(location)))
        return bool(fs.isdir(_key(str(location))))
    return Path(location).is_dir()


def is_file(location: Location) -> bool:
    if is_url(location):
        try:
            # not gcsfs's isfile, which answers False for any error: a bucket that stopped
            # answering would make a complete checkpoint look cut off
            return bool(_gcs().info(_key(str(location)))["type"] == "file")
        except FileNotFoundError:
            return False
    return Path(location).is_file()


def read_bytes(location: Location) -> bytes:
    if is_url(location):
        return bytes(_gcs().cat_file(_key(str(location))))
    return Path(location).read_bytes()


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: Location, data: bytes) -> None:
    """Replaces the file at `location` whole: readers see the old content or the new
    (one object upload on GCS, `files.write_bytes_atomic` locally, parents created)."""
    if is_url(location):
        _gcs().pipe_file(_key(str(location)), data)
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(location, data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def entries(directory: Location) -> list[tuple[str, bool]]:
    """`(name, is_dir)` of each entry of `directory` (empty when it does not exist)."""
    if is_url(directory):
        fs = _gcs()
        key = _key(str(directory))
        fs.invalidate_cache(key)
        try:
            listed = fs.ls(key, detail=True)
        except FileNotFoundError:
            return []
        return [(str(e["name"]).rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory")
                for e in listed if str(e["name"]).rstrip("/") != key]
    path = Path(directory)
    if not path.is_dir():
        return []
    return [(e.name, e.is_dir()) for e in path.iterdir()]


@dataclass(frozen=True)
class FileStat:
    """What identifies one version of a file without reading it."""

    size: int
    version: str  # local: the modification time in ns; GCS: the object's generation
    crc32c: str | None = None  # GCS only: the checksum GCS computed when the object was written


def file_stats(directory: Location) -> dict[str, FileStat]:
    """`{relative path: FileStat}` of every file under `directory`, recursively."""
    if is_url(directory):
        fs = _gcs()
        key = _key(str(directory))
        fs.invalidate_cache(key)
        found = fs.find(key, detail=True)
        return {name[len(key) + 1:]: FileStat(int(info["size"]), str(info.get("generation", "")),
                                              info.get("crc32c"))
                for name, info in sorted(found.items()) if info.get("type") == "file"}
    root = Path(directory)
    if not root.is_dir():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = FileStat(st.st_size, str(st.st_mtime_ns))
    return out


def sha256(location: Location) -> str:
    """The SHA-256 of a file's content, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    opener = _gcs().open(_key(str(location)), "rb") if is_url(location) else open(location, "rb")
    with opener as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def make_dirs(directory: Location) -> None:
    """Creates a local directory and its parents (object stores have no directories)."""
    if not is_url(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)


def move(source: Location, destination: Location) -> None:
    """Moves a file or directory tree: a rename locally, a copy then a delete on GCS
    (which has no rename); the destination's parent is created."""
    if is_url(source) != is_url(destination):
        raise ValueError(f"cannot move {source} to {destination}: one is local, one is not")
    if is_url(source):
        _gcs().mv(_key(str(source)), _key(str(destination)), recursive=True)
        return
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(source).rename(destination)


def remove_tree(location: Location) -> None:
    """Deletes a file or a directory tree (nothing when it does not exist)."""
    if is_url(location):
        fs = _gcs()
        if fs.exists(_key(str(location))):
            fs.rm(_key(str(location)), recursive=True)
        return
    path = Path(location)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_bucket(url: str, key: str) -> None:
    """A UserError naming `key` when the bucket of `url` does not exist or cannot be reached."""
    check_url(url, key)
    bucket = bucket_of(url)
    try:
        found = _gcs().exists(bucket)
    except StorageUnreachable as err:
        raise UserError(f"{key}={url!r}: {err}") from None
    except Exception as err:  # no credentials, no network: all fixable by the user
        raise UserError(f"{key}={url!r}: cannot reach the bucket '{bucket}': {type(err).__name__}: {err}") from None
    if not found:
        raise UserError(f"{key}={url!r}: no bucket '{bucket}' (create it, e.g. gcloud storage buckets create gs://{bucket})")


def cache_root() -> Path:
    """Where local copies of remote files go: `$MMPO_JAX_CACHE`, default `~/.cache/mmpo-jax`."""
    return Path(os.environ.get("MMPO_JAX_CACHE") or "~/.cache/mmpo-jax").expanduser()


def local_copy(url: str, key: str, say: Callable[[str], None] | None = None) -> Path:
    """A local copy of the file or directory tree at `url`, in `cache_root()/gcs/`.

    Files whose size and generation match the last copy are not fetched again; files
    gone from the bucket are removed from the copy. A UserError naming `key` when
    nothing is at `url`."""
    check_url(url, key)
    fs = _gcs()
    remote = _key(url)
    local = cache_root() / "gcs" / remote
    fs.invalidate_cache(remote)
    try:
        # not gcsfs's isfile, which answers False for any error (see `is_file`)
        info = fs.info(remote)
    except FileNotFoundError:
        info = {"type": None}
    if info["type"] == "file":
        stats = {"": FileStat(int(info["size"]), str(info.get("generation", "")))}
    else:
        stats = file_stats(url)
    if not stats:
        raise UserError(f"{key}={url!r}: nothing is stored there (no such object or folder in the bucket)")
    stamp_file = (local.parent / f"{local.name}{_STAMP_FILE}") if "" in stats else local / _STAMP_FILE
    try:
        had = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        had = {}
    want = {rel: [st.size, st.version] for rel, st in stats.items()}
    fetch = [rel for rel in want if had.get(rel) != want[rel] or not (local / rel).is_file()]
    if fetch:
        total = sum(stats[rel].size for rel in fetch)
        if say is not None:
            say(f"copying {len(fetch)} file(s), {total / 2**20:.1f} MiB, from {url} to {local}")
        for rel in fetch:
            target = local / rel if rel else local
            target.parent.mkdir(parents=True, exist_ok=True)
            # into a file of this process's own, then renamed: the processes of one machine
            # fetch the same model at once, and none may read another's half-written file
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            fs.get_file(f"{remote}/{rel}" if rel else remote, str(partial))
            os.replace(partial, target)
    if "" not in stats and local.is_dir():
        for path in local.rglob("*"):
            rel = str(path.relative_to(local))
            if path.is_file() and rel not in want and path.name != _STAMP_FILE and not path.name.endswith(".partial"):
                path.unlink()
    stamp_file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(stamp_file, json.dumps(want).encode())
    return local


def upload(local: Location, url: str, only: Callable[[str], bool] | None = None) -> list[str]:
    """Copies a local file, or every file of a local directory (those whose relative
    path passes `only`), to `url`; returns the relative paths copied."""
    source = Path(local)
    fs = _gcs()
    if source.is_file():
        fs.put_file(str(source), _key(url))
        return [source.name]
    sent = []
    for path in sorted(source.rglob("*")):
        rel = str(path.relative_to(source))
        if path.is_file() and (only is None or only(rel)):
            fs.put_file(str(path), f"{_key(url)}/{rel}")
            sent.append(rel)
    return sent


def fetched(spec: str, key: str) -> str:
    """`spec` as it is, or for a gs:// URL the path of its local copy (`local_copy`; the
    copy is announced on stderr, where `--json` output is not, by process 0 only, though
    every host makes its own)."""
    if not is_url(spec):
        return spec
    import jax  # lazy: the command line imports this module, and `mmpo-jax --help` needs no jax

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if jax.process_index() == 0 else None
    return str(local_copy(spec, key, say))
