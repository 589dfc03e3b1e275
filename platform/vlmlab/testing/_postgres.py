"""A real PostgreSQL server on loopback, for tests and benchmarks of the shared ledger.

:class:`LoopbackPostgres` runs the ``postgres`` binaries of the ``pgserver``
wheel (a pip-installable PostgreSQL build, in the ``dev`` extra), or those named
by ``$VLMLAB_PG_BIN``, as a child process: ``initdb`` into a temporary folder,
then ``postgres`` listening on ``127.0.0.1`` on a free port with trust
authentication. Clients reach it over TCP exactly as they reach an operator's
database. PostgreSQL refuses to run as root, so under root (CI containers) the
server runs as ``nobody`` from a copy of the binaries that user can read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from vlmlab.testing._loopback import LoopbackServer, free_port, stop_child

BIN_ENV = "VLMLAB_PG_BIN"
"""A folder with ``initdb`` and ``postgres`` to use instead of the pgserver wheel's."""

_UNPRIVILEGED = "nobody"


def postgres_binaries() -> Path:
    """The folder of ``initdb`` and ``postgres``: ``$VLMLAB_PG_BIN``, else pgserver's."""
    if os.environ.get(BIN_ENV):
        folder = Path(os.environ[BIN_ENV])
    else:
        spec = importlib.util.find_spec("pgserver")  # found, not imported: it has side effects
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "no PostgreSQL binaries: install the dev extra (the pgserver wheel) or set "
                f"${BIN_ENV} to a folder with initdb and postgres"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    for name in ("initdb", "postgres"):
        if not (folder / name).is_file():
            raise RuntimeError(
                f"{folder} has no {name} (set ${BIN_ENV} to a PostgreSQL bin folder)"
            )
    return folder


class LoopbackPostgres(LoopbackServer):
    """A throwaway PostgreSQL server on ``127.0.0.1``; ``uri(database)`` names a database.

    The server lives until :meth:`stop` (or the end of a ``with`` block) and its
    data folder is deleted then. ``fsync=False`` (tests) skips PostgreSQL's
    fsyncs; benchmarks keep them, as an operator's server does.
    """

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self.port = free_port()
        self.user = "vlmlab"
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Self:
        self._root = Path(tempfile.mkdtemp(prefix="vlmlab-pg-"))
        binaries = postgres_binaries()
        run_as: str | None = None
        if os.geteuid() == 0:
            run_as = _UNPRIVILEGED
            if not os.environ.get(BIN_ENV):  # an operator's own binaries are readable as they are
                binaries = self._readable_copy(binaries)
            os.chmod(self._root, 0o755)
        data = self._root / "data"
        data.mkdir()
        if run_as is not None:
            shutil.chown(data, run_as)
        environment = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
             "--no-locale", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, user=run_as, env=environment,
        )  # fmt: skip
        settings = ["-c", "max_connections=200"] + ([] if self.fsync else ["-c", "fsync=off"])
        # The server's log goes to a file: a pipe nobody reads would stall it once full.
        self._log = self._root / "postgres.log"
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", "", *settings],
                stdout=subprocess.DEVNULL, stderr=log, user=run_as, env=environment,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout_s)
        return self

    def _readable_copy(self, binaries: Path) -> Path:
        """pgserver's install copied where ``nobody`` can read it, in the wheel's layout
        (its binaries find their libraries at ``$ORIGIN/../../../pgserver.libs``)."""
        assert self._root is not None
        install = binaries.parent  # .../site-packages/pgserver/pginstall
        site = self._root / "site"
        copy = site / "pgserver" / "pginstall"
        for part in ("lib", "share"):
            shutil.copytree(install / part, copy / part, symlinks=True)
        (copy / "bin").mkdir(parents=True)
        for name in ("initdb", "postgres"):
            shutil.copy2(binaries / name, copy / "bin" / name)
        libraries = install.parent.parent / "pgserver.libs"
        if libraries.is_dir():
            shutil.copytree(libraries, site / "pgserver.libs", symlinks=True)
        for folder, _, files in os.walk(site):
            os.chmod(folder, 0o755)
            for name in files:
                if not (Path(folder) / name).is_symlink():
                    os.chmod(Path(folder) / name, 0o755)
        return copy / "bin"

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                error = self._log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited at start: {error}")
            try:
                psycopg.connect(self.uri("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"postgres not ready on port {self.port} in {timeout_s} s"
                    ) from None
                time.sleep(0.1)

    def uri(self, database: str = "postgres") -> str:
        """``postgresql://`` URI of ``database`` on this server."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URI."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.uri("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.uri(name)

    def stop(self) -> None:
        if self._process is not None:
            # SIGINT is postgres's "fast" shutdown.
            stop_child(self._process, first=signal.SIGINT, timeout_s=30)
            self._process = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
