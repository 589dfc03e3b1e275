"""Where results live: a local folder or any filesystem pyarrow supports (S3, GCS, ...).

A results root is named by a path (``results/quickstart``) or a URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``). Everything that writes or
reads results (runs, steps, artifacts, checkpoints, Tune's storage, the ledger
audit) goes through a :class:`Location`, so the same code serves a laptop's
disk and a cluster's object store, and a sweep can be resumed from the URI
alone on a new cluster.

Credentials follow pyarrow's usual chain (environment, ``~/.aws``, instance
roles; ``$GOOGLE_APPLICATION_CREDENTIALS`` or the VM's account for GCS). For
S3-compatible stores (MinIO, Ceph, a test's loopback server) give the endpoint
in the URI (``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``)
or in ``$AWS_ENDPOINT_URL``, which pyarrow reads. A URI is passed to Ray workers
as a string, so whatever it carries reaches every node; printed forms are
``s3://bucket/key``, without keys or query.

Why writes are atomic everywhere: a killed writer must never leave a partial
file visible to readers. On local disks a write goes to a hidden temporary and
is renamed (:mod:`vlmlab._io`); on object stores an object becomes visible only
when its upload completes, and the writer hands pyarrow the whole serialized
object at once, so a killed writer leaves nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vlmlab._io import atomic_write_bytes

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CREDENTIALS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def is_uri(target: str | Path) -> bool:
    """True for ``scheme://...`` names other than ``file://`` (a remote filesystem)."""
    text = str(target)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def redact(uri: str) -> str:
    """``uri`` without a ``key:secret@`` part (for messages and logs)."""
    return _CREDENTIALS.sub(r"\1***@", uri)


@dataclass(frozen=True)
class Location:
    """A file or folder on a pyarrow filesystem, with the URI that names it.

    ``uri`` is what another process needs to reach the same place (a local
    absolute path, or the remote URI with its query kept); ``path`` is the name
    within ``filesystem``.
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str

    # ------------------------------------------------------------- naming
    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The local path; raises for a remote location (say what needs a local one)."""
        if not self.is_local:
            raise ValueError(f"{self} is not on the local disk")
        return Path(self.path)

    @property
    def native(self) -> Path | str:
        """A ``Path`` for a local location, the URI for a remote one."""
        return Path(self.path) if self.is_local else self.uri

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        """The local path, or ``scheme://bucket/key`` (no credentials, no endpoint query)."""
        if self.is_local:
            return self.path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path}"

    def __truediv__(self, part: str) -> Location:
        return self.child(part)

    def child(self, *parts: str) -> Location:
        relative = "/".join(p.strip("/") for p in parts if p)
        if not relative:
            return self
        if self.is_local:
            path = str(Path(self.path, relative))
            return Location(self.filesystem, path, path)
        base, _, query = self.uri.partition("?")
        uri = f"{base.rstrip('/')}/{relative}" + (f"?{query}" if query else "")
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{relative}", uri)

    # ------------------------------------------------------------- reading
    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        return bool(self._info().type == pafs.FileType.Directory)

    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {str(self)!r}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def entries(self, *, suffix: str = "", folders: bool = False) -> list[Location]:
        """Files (or, with ``folders``, sub-folders) directly in this folder, sorted.

        Hidden names (``.x``: a local writer's temporaries) are skipped; a missing
        folder has no entries.

        On an object store a folder is a name prefix, and not every filesystem lists
        prefixes (pyarrow's GCS lists only marker objects), so sub-folders there are
        read off the names of the objects below.
        """
        if folders and not self.is_local:
            return [self.child(name) for name in self._object_store_folders(suffix)]
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        wanted = pafs.FileType.Directory if folders else pafs.FileType.File
        found = []
        for info in self.filesystem.get_file_info(selector):
            name = info.base_name
            if info.type == wanted and not name.startswith(".") and name.endswith(suffix):
                found.append(self.child(name))
        return sorted(found, key=lambda loc: loc.path)

    def _object_store_folders(self, suffix: str) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        base = self.path.rstrip("/") + "/"
        names = set()
        for info in self.filesystem.get_file_info(selector):
            relative = info.path.removeprefix(base)
            name, below, _ = relative.partition("/")
            if (below or info.type == pafs.FileType.Directory) and name:
                names.add(name)
        return sorted(n for n in names if not n.startswith(".") and n.endswith(suffix))

    # ------------------------------------------------------------- writing
    def make_folder(self) -> None:
        """Create the folder (object stores have no folders: nothing to do there)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data``, atomically (see the module docstring)."""
        if self.is_local:
            atomic_write_bytes(self.path, data)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self, *, missing_ok: bool = True) -> None:
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def locate(target: str | Path | Location) -> Location:
    """The :class:`Location` named by a local path, a ``file://`` URI or a remote URI.

    Raises:
        ValueError: a URI pyarrow cannot open (unknown scheme, malformed query),
            with the URI (credentials hidden) and pyarrow's reason.
    """
    if isinstance(target, Location):
        return target
    text = str(target)
    if not is_uri(text):
        path = str(Path(text.removeprefix("file://")).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), path, path)
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot open results location {redact(text)!r}: {error}") from None
    return Location(filesystem, path.rstrip("/"), text)


def tune_storage(location: Location) -> dict[str, Any]:
    """``storage_path`` / ``storage_filesystem`` for Ray Tune's ``RunConfig`` at ``location``.

    Tune is given the filesystem object itself, so an endpoint or credentials in
    the URI reach it the same way they reach every other writer.
    """
    if location.is_local:
        return {"storage_path": location.path}
    return {"storage_path": location.path, "storage_filesystem": location.filesystem}
