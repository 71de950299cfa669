"""One output root (a local folder or a cloud URI) with atomic writes, through pyarrow filesystems.

``Store("results/run")``, ``Store("/abs/path")``, ``Store("file:///abs/path")`` and
``Store("s3://bucket/prefix")`` (or ``gs://``, ``hdfs://``: whatever
``pyarrow.fs.FileSystem.from_uri`` knows) behave the same. A write goes to a hidden
temporary name beside the target and is renamed into place once complete, so a reader (or
a resumed run) never sees a half-written file; on object stores, where pyarrow's ``move``
is a copy, the object is written directly instead, since an object store only makes an
object visible once its upload has completed (the same guarantee without the extra copy).
"""
from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from tn_ray.errors import InputError, OutputError

TMP_SUFFIX = ".tmp"


def _is_uri(root: str) -> bool:
    return "://" in root


def absolute(path_or_uri: str) -> str:
    """A cloud URI unchanged; a local path made absolute against the driver's working folder.

    Ray Train workers and Tune trials run in folders of Ray's own, so a relative ``out`` read
    there would land inside Ray's session folder: every config resolves its outputs here, once.
    """
    return path_or_uri if _is_uri(path_or_uri) else os.path.abspath(os.path.expanduser(path_or_uri))


class Store:
    """Files under one root; paths passed to methods are relative, '/'-separated."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if _is_uri(root):
            self.fs, base = pafs.FileSystem.from_uri(root)
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.base = base.rstrip("/") or "/"
        self.root = root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def path(self, rel: str) -> str:
        """Path of ``rel`` inside the filesystem (what pyarrow calls take)."""
        return posixpath.join(self.base, rel) if rel else self.base

    def uri(self, rel: str) -> str:
        """A string another process can open: a local absolute path, or a full URI."""
        if self.local:
            return self.path(rel)
        scheme = self.root.split("://", 1)[0]
        query = self.root.split("?", 1)[1] if "?" in self.root else ""  # e.g. endpoint_override
        return f"{scheme}://{self.path(rel).lstrip('/')}" + (f"?{query}" if query else "")

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def _tmp(self, rel: str) -> str:
        head, name = posixpath.split(self.path(rel))
        return posixpath.join(head, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically create or replace ``rel`` with ``data``."""
        self.fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
        if not self.local:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
            return
        tmp = self._tmp(rel)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(rel))  # rename(2): atomic on one filesystem

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_table(self, rel: str, table: pa.Table) -> None:
        """Atomically write a Parquet file."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue().to_pybytes())

    def read_table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, schema=schema)

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """Relative paths of the completed files under ``rel`` (recursive; temporaries left out)."""
        if not self.exists(rel):
            return []
        sel = pafs.FileSelector(self.path(rel), recursive=True)
        base = self.base.rstrip("/") + "/"
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or info.base_name.endswith(TMP_SUFFIX):
                continue
            if info.path.endswith(suffix):
                out.append(info.path[len(base):] if info.path.startswith(base) else info.path)
        return sorted(out)

    def remove_temporaries(self, rel: str) -> int:
        """Delete the temporaries a crashed writer left under ``rel``; returns how many."""
        if not self.exists(rel):
            return 0
        n = 0
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True)):
            if (
                info.type == pafs.FileType.File
                and info.base_name.startswith(".")
                and info.base_name.endswith(TMP_SUFFIX)
            ):
                try:
                    self.fs.delete_file(info.path)
                    n += 1
                except FileNotFoundError:  # a dying writer renamed it meanwhile
                    pass
        return n

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))


def local_cache(*parts: str) -> Path:
    """A folder of this machine's cache: ``$TN_RAY_CACHE_DIR`` or ``~/.cache/tn_ray``, then ``parts``."""
    base = os.environ.get("TN_RAY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tn_ray")
    return Path(base, *parts)


def read_any(path_or_uri: str | os.PathLike) -> bytes:
    """The bytes of a local path or of a URI any pyarrow filesystem knows."""
    text = str(path_or_uri)
    if _is_uri(text):
        filesystem, path = pafs.FileSystem.from_uri(text)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    return Path(text).read_bytes()


def read_json(path_or_uri: str | os.PathLike, what: str = "file", hint: str = "") -> object:
    """The content of a JSON file (a local path or a URI); :class:`tn_ray.errors.InputError` naming the
    file for a missing file, bytes that are not UTF-8 and invalid JSON (with line and column), followed
    by ``hint`` (what to do) when given. The one JSON reader of user and run-folder files."""
    import json

    text = str(path_or_uri)
    tail = f"; {hint}" if hint else ""
    if not _is_uri(text):
        p = Path(text)
        if not p.is_file():
            raise InputError((f"{what} not found: {p}" if not p.exists() else f"{what} {p} is not a file") + tail)
    try:
        return json.loads(read_any(text).decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {text}{tail}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{text}: not UTF-8 text (byte {err.start}: {err.reason}){tail}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{text}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}){tail}") from None


def join_uri(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI, keeping URI options (``?endpoint_override=...``) last."""
    text, sep, query = str(root).partition("?")
    joined = "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return joined + sep + query


class PartTable:
    """A Parquet table kept as part files under one folder of a :class:`Store`: each batch is
    appended as its own atomically written part (a crash loses at most the batch in flight),
    reads concatenate the parts and keep the last row per ``keys``, and :meth:`compact`
    merges the parts (the merged part is written before any is deleted, so an interruption
    at any point loses nothing). The reward cache and the generation manifest are both one."""

    def __init__(self, store: Store, folder: str, schema: pa.Schema, keys: Sequence[str]):
        self.store, self.folder, self.schema, self.keys = store, folder.strip("/"), schema, list(keys)

    def parts(self) -> list[str]:
        """Relative paths of the finished part files (temporaries of a crash left out)."""
        return [p for p in self.store.list_files(self.folder, ".parquet") if p.rsplit("/", 1)[-1].startswith("part-")]

    def read(self):
        """Every row, deduplicated by ``keys`` (the last written wins), as pandas."""
        parts = self.parts()
        if not parts:
            return self.schema.empty_table().to_pandas()
        df = pa.concat_tables([self.store.read_table(p, schema=self.schema) for p in parts]).to_pandas()
        return df.drop_duplicates(self.keys, keep="last").reset_index(drop=True)

    def append(self, df) -> None:
        """Persist one batch (a pandas frame holding the schema's columns) atomically."""
        if len(df):
            table = pa.Table.from_pandas(df[self.schema.names], schema=self.schema, preserve_index=False)
            self.store.write_table(f"{self.folder}/part-{uuid.uuid4().hex}.parquet", table)

    def rewrite(self, df) -> None:
        """Replace the table by ``df``: written as one part before the old parts are deleted, so
        an interruption leaves the old rows (or both, deduplicated on read), never none."""
        parts = self.parts()
        self.append(df)
        for p in parts:
            self.store.delete(p)

    def compact(self) -> None:
        parts = self.parts()
        if len(parts) > 1:
            self.append(self.read())
            for p in parts:
                self.store.delete(p)


def check_output_dir(path: str | os.PathLike) -> Path:
    """A local output folder that exists (created if needed) and is writable, checked before any
    work starts; :class:`tn_ray.errors.OutputError` naming it otherwise (a file in its place, a
    parent that is a file, no write permission). A cloud URI is checked by
    :func:`check_output_uri` and returned as given."""

    if _is_uri(str(path)):
        return check_output_uri(str(path))  # type: ignore[return-value]
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            what = "the output folder" if parent == p else f"the output folder {p}: its parent"
            raise OutputError(f"{what} {parent} is an existing file, not a folder")
        if parent.exists():
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to the output folder {p}: {err.strerror or err}") from None
    return p


def check_output_uri(uri: str) -> str:
    """A cloud output folder that can be written (a probe object is written and deleted);
    :class:`tn_ray.errors.OutputError` naming it otherwise (an object in its place, a bucket
    that does not exist or refuses the credentials)."""

    try:
        store = Store(uri)
        if store.fs.get_file_info(store.base).type == pafs.FileType.File:
            raise OutputError(f"the output location {uri} is an existing file, not a folder")
        probe = f".write-test-{uuid.uuid4().hex}"
        store.write_bytes(probe, b"")
        store.delete(probe)
    except OutputError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        raise OutputError(f"cannot write to the output location {uri}: {str(err).splitlines()[0]}") from None
    return uri


def check_output_file(path: str | os.PathLike) -> Path:
    """An output file that can be written: its folder is checked as :func:`check_output_dir`
    does, and the file itself must not be a folder."""

    p = Path(path)
    if p.is_dir():
        raise OutputError(f"the output file {p} is an existing folder")
    check_output_dir(p.parent if str(p.parent) else ".")
    return p
