"""Click commands: parse, call, map errors to exit codes. No logic."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from tunnel import __version__, pki
from tunnel.config import Address, ConfigError, load_paths, parse_address
from tunnel.passwords import read_password_file, readable_by_others

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad usage or bad configuration

# User-facing error types reported as "error: <message>" with EXIT_USAGE.
# Add new ones here (e.g. a config error) rather than catching them in each command.
USAGE_ERRORS: tuple[type[Exception], ...] = (pki.PKIError, ConfigError)


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """Report USAGE_ERRORS as "error: ..." on stderr and exit 2; OSError likewise with exit 1.

    Anything else propagates (a traceback and exit 1): that is a bug.
    Usable as a context manager or as a decorator; ``main`` already wraps every command in it.
    """
    try:
        yield
    except USAGE_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILURE) from None


class _Group(click.Group):
    """A group whose subcommands all run inside ``_exit_codes()``."""

    def invoke(self, ctx: click.Context) -> Any:
        with _exit_codes():
            return super().invoke(ctx)


_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    show_default=True,
    help="CA directory.",
)
_days = click.IntRange(min=1)
_key_types = click.Choice(pki.KEY_TYPES)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="tunnel")
def main() -> None:
    """Mutual-TLS tunnel daemon with its own private CA."""


@main.group()
def ca() -> None:
    """Manage the private CA: init, issue, revoke, list, show."""


@ca.command("init")
@_dir_option
@click.option("--name", default="tunnel private CA", show_default=True, help="CA common name.")
@click.option(
    "--days",
    type=_days,
    help=f"CA validity [default: {pki.ROOT_DAYS} for a root, {pki.INTERMEDIATE_DAYS} for an intermediate].",
)
@click.option("--key-type", type=_key_types, default="ec", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA key and certificate.")
@click.option(
    "--parent",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="ROOTDIR",
    help="Make an intermediate CA signed by the CA in ROOTDIR (which can then go offline).",
)
def ca_init(directory: Path, name: str, days: int | None, key_type: str, force: bool, parent: Path | None) -> None:
    """Create the CA key, certificate and an empty CRL: a self-signed root, or with
    --parent an intermediate CA whose issued certificates carry its chain.

    \b
    Example:
      tunnel ca init --dir root --name "Example root CA"
      tunnel ca init --dir issuing --parent root --name "Example issuing CA"
    """
    pki.init_ca(directory, name=name, days=days, key_type=key_type, force=force, parent=parent)
    files = [pki.CA_CRT, pki.CA_KEY, pki.CRL_FILE] + ([pki.CHAIN_FILE, pki.ROOT_CRT] if parent else [])
    click.echo(f"wrote {', '.join(str(directory / f) for f in files)}")
    if parent is not None:
        click.echo(f"wrote {parent / (directory.resolve().name + '.crt')} (revoke the intermediate there)")


@ca.command("issue")
@_dir_option
@click.argument("name")
@click.option("--server", is_flag=True, help="Issue a server certificate (serverAuth).")
@click.option("--client", is_flag=True, help="Issue a client certificate (clientAuth).")
@click.option("--dns", multiple=True, metavar="NAME", help="DNS subjectAltName (repeatable).")
@click.option("--ip", multiple=True, metavar="ADDR", help="IP subjectAltName (repeatable).")
@click.option("--uri", multiple=True, metavar="URI", help="URI subjectAltName (repeatable).")
@click.option("--ou", help="Organizational unit in the subject.")
@click.option("--days", type=_days, default=365, show_default=True, help="Validity.")
@click.option("--key-type", type=_key_types, help="Key type (default: the CA's).")
@click.option("--force", is_flag=True, help="Replace an existing NAME.key and NAME.crt.")
@click.option(
    "--key-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Encrypt NAME.key with the password in this file (one trailing newline ignored).",
)
def ca_issue(
    directory: Path,
    name: str,
    server: bool,
    client: bool,
    dns: Sequence[str],
    ip: Sequence[str],
    uri: Sequence[str],
    ou: str | None,
    days: int,
    key_type: str | None,
    force: bool,
    key_password_file: Path | None,
) -> None:
    """Issue NAME.crt and NAME.key signed by the CA."""
    if server == client:
        raise click.UsageError("exactly one of --server or --client is required")
    key_password = None
    if key_password_file is not None:
        try:
            key_password = read_password_file(key_password_file)
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {key_password_file}: {exc.strerror or exc}", param_hint="--key-password-file"
            ) from None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--key-password-file") from None
    crt, key = pki.issue(
        directory,
        name,
        kind="server" if server else "client",
        dns=dns,
        ips=ip,
        uris=uri,
        ou=ou,
        days=days,
        force=force,
        key_type=key_type,
        key_password=key_password,
    )
    click.echo(f"wrote {crt} and {key}")


@ca.command("revoke")
@_dir_option
@click.argument("name")
def ca_revoke(directory: Path, name: str) -> None:
    """Revoke NAME.crt and re-sign the CRL."""
    serial = pki.revoke(directory, name)
    click.echo(f"revoked {name} (serial {serial:x}); wrote {directory / pki.CRL_FILE}")


@ca.command("crl")
@_dir_option
def ca_crl(directory: Path) -> None:
    """Re-sign crl.pem (same revocations) with a fresh next-update time."""
    next_update = pki.refresh_crl(directory)
    click.echo(f"wrote {directory / pki.CRL_FILE} (next update {next_update:%Y-%m-%d})")


@ca.command("list")
@_dir_option
def ca_list(directory: Path) -> None:
    """List issued certificates."""
    issued = pki.list_issued(directory)
    if not issued:
        click.echo(f"no certificates issued in {directory}")
        return
    from tunnel.status import text_table

    rows = [[c.name, c.kind, f"{c.serial:x}", f"{c.not_after:%Y-%m-%d}", c.status()] for c in issued]
    for line in text_table(["NAME", "KIND", "SERIAL", "EXPIRES", "STATUS"], rows):
        click.echo(line)


@ca.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def ca_show(file: Path) -> None:
    """Describe a PEM certificate or CRL."""
    click.echo(pki.describe(file))


_paths_argument = click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH...")


@main.command()
@_paths_argument
def check(paths: tuple[Path, ...]) -> None:
    """Validate tunnel files and the certificates they name."""
    from tunnel.daemon import build_states

    for state in build_states(load_paths(paths)):  # building checks the certificates too
        config = state.config
        for warning in state.warnings:
            click.echo(f"warning: {warning}", err=True)
        password_file = config.tls.key_password_file
        if password_file is not None and readable_by_others(password_file):
            click.echo(
                f"warning: {config.source}: tls.key_password_file: {password_file} is readable by every user "
                "(chmod o-r it)",
                err=True,
            )
        click.echo(f"ok: {config.source} ({config.name}: {config.mode}, listen {config.listen})")


def _address(value: str) -> Address:
    try:
        address = parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if address.is_unix:
        raise click.BadParameter("expected HOST:PORT")
    return address


@main.command()
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Log line format."
)
@click.option("--status", "status", multiple=True, metavar="HOST:PORT", help="Serve /healthz, /metrics, /connections.")
@click.option("--watch-interval", type=float, default=1.0, hidden=True, help="Seconds between file checks; 0 = off.")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes sharing every listener (SO_REUSEPORT). Default: the largest `workers:` in the files, or 1.",
)
@click.option("--worker", is_flag=True, hidden=True, help="Run as one worker of a supervisor.")
@click.option("--worker-status", hidden=True, type=click.Path(path_type=Path), help="A worker's private status socket.")
@_paths_argument
def run(
    paths: tuple[Path, ...],
    log_format: str,
    status: tuple[str, ...],
    watch_interval: float,
    workers: int | None,
    worker: bool,
    worker_status: Path | None,
) -> None:
    """Run every tunnel named (files, or directories of *.yaml) until SIGTERM/SIGINT."""
    import trio

    from tunnel import logs
    from tunnel.daemon import Daemon, build_states

    addresses = [_address(value) for value in status]
    logs.setup(log_format)
    configs = load_paths(paths)
    states = build_states(configs)
    count = workers if workers is not None else max(config.workers for config in configs)
    if worker:
        private = [Address(path=str(worker_status))] if worker_status else []
        trio.run(Daemon(paths, states, watch_interval=0, status=private, worker=True).run)
    elif count > 1:
        from tunnel.workers import Supervisor, check_listen_addresses, check_ports_free

        check_listen_addresses(configs)
        check_ports_free(configs)
        supervisor = Supervisor(
            paths, configs, workers=count, log_format=log_format, status=addresses, watch_interval=watch_interval
        )
        trio.run(supervisor.run)
    else:
        trio.run(Daemon(paths, states, watch_interval=watch_interval, status=addresses).run)


@main.command()
@click.argument("address", default="127.0.0.1:9100", metavar="[HOST:PORT]")
@click.option("--health", is_flag=True, help="Print only the health; exit 0 if healthy, 1 if not.")
def status(address: str, health: bool) -> None:
    """Who is connected now, and each tunnel's health (from a daemon's status address)."""
    from tunnel.logs import escape
    from tunnel.status import StatusUnavailable, fetch, render

    where = _address(address)
    try:
        code, health_doc = fetch(where, "/healthz")
        rows = [] if health else fetch(where, "/connections")[1]["connections"]
    except StatusUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    click.echo(escape(str(health_doc.get("status", "?"))) if health else render(health_doc, rows))
    raise SystemExit(EXIT_OK if code == 200 else EXIT_FAILURE)


if __name__ == "__main__":
    main(prog_name="tunnel")
