"""Commands that serve: `serve` (adapters and the black box over HTTP) and `keys add|list`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    pass

from vlmlab.cli._app import app
from vlmlab.cli._common import (
    _fail,
    _weights_named,
)


class _KeysWatcher:
    """Reloads the keys file of a running ``vlmlab serve`` on SIGHUP or when it changes.

    A change is a new modification time, size or inode (an editor's atomic save
    replaces the file). A broken file is reported and the served keys stay as
    they were.
    """

    def __init__(self, path: str, console: Any, *, allow_empty: bool = False) -> None:
        self.path = Path(path)
        self.console = console
        self.allow_empty = allow_empty
        self.requested = False
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def request(self, signum: int, frame: Any) -> None:  # the SIGHUP handler
        self.requested = True

    def poll(self) -> None:
        stamp = self._stamp()
        if not self.requested and stamp == self.seen:
            return
        why = "SIGHUP" if self.requested else "the file changed"
        self.requested, self.seen = False, stamp
        from vlmlab.serving import KeysFileError, reload_keys

        try:
            changes = reload_keys(self.path, allow_empty=self.allow_empty)
        except KeysFileError as error:
            self.console.print(f"keys not reloaded ({why}), the served keys stay: {error}")
            return
        except Exception as error:
            self.console.print(
                f"keys not reloaded ({why}), the served keys stay: {type(error).__name__}: {error}"
            )
            return
        summary = ", ".join(f"{what} {names}" for what, names in changes.items() if names)
        self.console.print(f"keys reloaded ({why}): {summary or 'no change'}", soft_wrap=True)


LEDGER_MEMORY = "memory"
"""``vlmlab serve --ledger memory``: no journal, whatever ``$VLMLAB_LEDGER_JOURNAL`` says."""


def _ledger_journal(ledger: str | None, keys: str) -> str | None:
    """Where the served keys' ledger journals: the flag, the environment, else beside the keys.

    Budgets survive by default: a service restarted with the same keys file
    finds every key's spent queries in ``<keys file>.ledger.sqlite``.
    """
    import os

    from vlmlab.pool import JOURNAL_ENV

    if ledger == LEDGER_MEMORY:
        os.environ.pop(JOURNAL_ENV, None)  # the ledger actor's own default would read it
        return None
    if ledger is not None:
        return ledger
    if os.environ.get(JOURNAL_ENV):
        return os.environ[JOURNAL_ENV]
    path = Path(keys)
    return str(path.with_name(path.name.removesuffix(path.suffix) + ".ledger.sqlite"))


@app.command("serve")
def serve_command(
    root: Annotated[
        str | None,
        typer.Argument(help="folder of artifact folders, e.g. results/quickstart/artifacts"),
    ] = None,
    keys: Annotated[
        str | None,
        typer.Option(help="keys file (`vlmlab keys add`): serves the black box at /v1/oracle/*"),
    ] = None,
    oracle: Annotated[
        str, typer.Option(help="the black box behind /v1/oracle: conse | open_clip:<arch>")
    ] = "conse",
    oracle_pretrained: Annotated[
        str | None, typer.Option(help="open_clip weights: a tag (openai) or a checkpoint path")
    ] = None,
    oracle_replicas: Annotated[int, typer.Option(help="oracle replicas")] = 1,
    oracle_cpus: Annotated[float, typer.Option(help="CPUs per oracle replica")] = 1.0,
    oracle_gpus: Annotated[float, typer.Option(help="GPUs per oracle replica")] = 0.0,
    max_request_mb: Annotated[
        float, typer.Option(help="largest request body, MB (image-set uploads are the big ones)")
    ] = 8.0,
    host: Annotated[str, typer.Option(help="HTTP address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(help="adapter replicas (each loads the backend)")] = 1,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per replica")] = 0.0,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray)")
    ] = None,
    ledger: Annotated[
        str | None,
        typer.Option(
            help="where the query ledger keeps its book: a SQLite file, a postgresql:// URI "
            "(one book shared by several services), or `memory` (none: spent queries last as "
            "long as the Ray cluster) (default: $VLMLAB_LEDGER_JOURNAL, else "
            "<keys file>.ledger.sqlite beside the keys file)"
        ),
    ] = None,
    allow_no_keys: Annotated[
        bool,
        typer.Option(
            "--allow-no-keys",
            help="serve a keys file that holds no keys (refused otherwise, at start and on "
            "reload: an emptied file would lock every client out)",
        ),
    ] = False,
) -> None:
    """Serve every adapted model under ROOT, and with --keys the black box, over HTTP.

    Ray Serve with a FastAPI ingress (docs at /docs). Adapters: POST /v1/classify
    {adapter, image, top_k}; GET /v1/adapters. Oracle (API key as a Bearer token):
    POST /v1/oracle/image-sets, POST /v1/oracle/logits, GET /v1/oracle/usage.
    GET /healthz. Runs until interrupted (Ctrl-C or SIGTERM), then removes its app.
    """
    import time

    from rich.console import Console

    console = Console()
    try:
        from vlmlab.serving import AdapterStore, load_keys

        if root is None and keys is None:
            raise _fail("nothing to serve: give an artifact ROOT, --keys FILE, or both")
        if keys is not None:
            _weights_named(oracle, oracle_pretrained, "--oracle-pretrained")
        ids = AdapterStore(root).ids() if root is not None else []
        if root is not None and not ids:
            raise _fail(f"no artifacts (folders with manifest.json) under {root!r}")
        served = [f"{len(ids)} adapter(s)"] if root is not None else []
        if keys is not None:
            count = len(load_keys(keys, allow_empty=allow_no_keys))
            served.append(f"the {oracle} oracle for {count} key(s)")
            ledger = _ledger_journal(ledger, keys)
        from vlmlab.serving import APP_NAME, serve_adapters

        with console.status(f"starting Ray Serve with {' and '.join(served)}..."):
            url = serve_adapters(
                root,
                host=host,
                port=port,
                address=address,
                num_replicas=replicas,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                keys=keys,
                oracle={"name": oracle, "pretrained": oracle_pretrained},
                oracle_replicas=oracle_replicas,
                oracle_cpus=oracle_cpus,
                oracle_gpus=oracle_gpus,
                max_request_bytes=int(max_request_mb * 1024 * 1024),
                ledger=ledger,
                allow_no_keys=allow_no_keys,
            )
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if keys is not None:
        from vlmlab.oracle import redact_postgres_uri
        from vlmlab.pool import RemoteLedger

        journal = RemoteLedger().journal()
        console.print(
            f"query ledger: journaled to {redact_postgres_uri(journal)}"
            if journal
            else "query ledger: in memory (--ledger memory); the keys' spent queries last as "
            "long as this Ray cluster",
            soft_wrap=True,
        )
    console.print(  # one line, whatever the width: scripts grep it for the URL
        f"serving {' and '.join(served)} at {url} (API docs: {url}/docs); Ctrl-C stops",
        soft_wrap=True,
    )
    import signal

    def _stop(signum, frame):  # SIGTERM (a process manager) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    watcher = _KeysWatcher(keys, console, allow_empty=allow_no_keys) if keys is not None else None
    if watcher is not None:
        signal.signal(signal.SIGHUP, watcher.request)
    try:
        while True:
            time.sleep(1.0)
            if watcher is not None:
                watcher.poll()
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(APP_NAME)
        console.print(f"stopped: removed the {APP_NAME} app")


keys_app = typer.Typer(help="API keys of the oracle service, stored as SHA-256 digests.")
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="the key's name (letters, digits, . _ -)")],
    file: Annotated[str, typer.Option(help="keys file, created if missing")] = "keys.yaml",
    budget: Annotated[int | None, typer.Option(help="queries in total (default: no cap)")] = None,
    rate: Annotated[
        float | None, typer.Option(help="requests a second, sustained (default: no limit)")
    ] = None,
    burst: Annotated[int, typer.Option(help="requests at once above the rate")] = 10,
    max_images: Annotated[int, typer.Option(help="images the key may register")] = 10_000,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="a per-key limit as NAME=VALUE, repeatable (e.g. max_classes=100); "
            "README, 'Limits', lists them with their defaults"
        ),
    ] = None,
) -> None:
    """Create an API key: prints it once; the file keeps only its digest."""
    from vlmlab.serving import KEY_LIMITS, KeysFileError, add_key

    limits: dict[str, int] = {}
    for item in limit or []:
        setting, _, value = item.partition("=")
        if (
            setting.strip() not in KEY_LIMITS
            or not value.strip().isascii()
            or not value.strip().isdigit()
        ):
            raise _fail(f"--limit {item!r}: give NAME=INTEGER, NAME one of {', '.join(KEY_LIMITS)}")
        limits[setting.strip()] = int(value)
    try:
        token = add_key(
            file, name, budget=budget, rate=rate, burst=burst, max_images=max_images, **limits
        )
    except KeysFileError as error:
        raise _fail(str(error)) from None
    typer.echo(token)
    typer.echo(
        f"key {name!r} added to {file} (only its SHA-256 is stored: keep the key now)", err=True
    )


@keys_app.command("list")
def keys_list(
    file: Annotated[str, typer.Option(help="keys file")] = "keys.yaml",
) -> None:
    """The keys in a file with their budgets and limits (never the keys themselves)."""
    from vlmlab.serving import KEY_LIMITS, ApiKey, KeysFileError, load_keys

    try:
        keys = load_keys(file, allow_empty=True)
    except KeysFileError as error:
        raise _fail(str(error)) from None
    defaults = ApiKey(sha256="0" * 64)
    for name, key in keys.items():
        rate = "no rate limit" if key.rate is None else f"{key.rate:g}/s (burst {key.burst})"
        budget = "no budget cap" if key.budget is None else f"budget {key.budget}"
        changed = "".join(
            f", {limit} {getattr(key, limit)}"
            for limit in KEY_LIMITS
            if limit != "max_images" and getattr(key, limit) != getattr(defaults, limit)
        )
        typer.echo(
            f"{name:20s} {budget}, {rate}, {key.max_images} images{changed}, "
            f"sha256 {key.sha256[:12]}…"
        )
