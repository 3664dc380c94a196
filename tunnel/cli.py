"""Click commands: parse, call, map errors to exit codes. No logic."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from tunnel import __version__, pki
from tunnel.activation import ActivationError
from tunnel.config import Address, ConfigError, load_paths, parse_address, parse_duration
from tunnel.passwords import read_password_file

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad usage or bad configuration
DEFAULT_STATUS = "127.0.0.1:9100"

# User-facing error types reported as "error: <message>" with EXIT_USAGE.
# Add new ones here (e.g. a config error) rather than catching them in each command.
USAGE_ERRORS: tuple[type[Exception], ...] = (pki.PKIError, ConfigError, ActivationError)


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
        click.echo(f"error: {_describe(exc)}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    except BaseExceptionGroup as group:  # from a trio nursery: report the cause, not the tree
        usage = group.subgroup(USAGE_ERRORS)
        cause = _first_leaf(usage) or _first_leaf(group.subgroup(OSError))
        if cause is None:
            raise
        click.echo(f"error: {_describe(cause)}", err=True)
        raise SystemExit(EXIT_USAGE if usage is not None else EXIT_FAILURE) from None


def _describe(exc: BaseException) -> str:
    """An error for the user: an OSError we worded ourselves without its "[Errno N]"."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


def _first_leaf(group: BaseExceptionGroup[BaseException] | None) -> BaseException | None:
    """The first exception a group holds, however deeply nested; None for no group."""
    while group is not None:
        first = group.exceptions[0]
        if not isinstance(first, BaseExceptionGroup):
            return first
        group = first
    return None


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


def _lifetime(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.timedelta | None:
    """--lifetime: a duration as tunnel files write them."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be more than zero")
    return dt.timedelta(seconds=seconds)


_key_types = click.Choice(pki.KEY_TYPES)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: ours, and what a bug report needs besides (Python, OpenSSL, trio, cryptography)."""
    if not value or ctx.resilient_parsing:
        return
    import platform
    import ssl

    import cryptography
    import trio

    click.echo(f"tunnel {__version__}")
    click.echo(f"Python {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})")
    click.echo(ssl.OPENSSL_VERSION)
    click.echo(f"trio {trio.__version__}")
    click.echo(f"cryptography {cryptography.__version__}")
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version, with Python's, OpenSSL's, trio's and cryptography's, and exit.",
)
def main() -> None:
    """Mutual-TLS tunnel daemon with its own private CA.

    \b
    Start with:
      tunnel ca init --dir certs            # a private CA
      tunnel ca issue --dir certs redis --server --dns redis.internal
      tunnel ca issue --dir certs app1 --client
      tunnel check /etc/tunnel/             # validate the tunnel files
      tunnel run /etc/tunnel/               # serve them (SIGHUP reloads)
      tunnel status                         # who is connected

    Shell completion (bash): eval "$(_TUNNEL_COMPLETE=bash_source tunnel)"
    """


@main.group(short_help="The private CA: init, issue, revoke, crl, list, show.")
def ca() -> None:
    """Manage the private CA: init, issue, revoke, crl, list, show.

    \b
    Example:
      tunnel ca init --dir certs
      tunnel ca issue --dir certs app1 --client
      tunnel ca revoke --dir certs app1
    """


@ca.command("init", short_help="Create a root CA, or an intermediate with --parent.")
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


def _kind_and_names(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--server / --client (exactly one) and --dns / --ip / --uri, for `issue` and `token`."""
    options = [
        click.option(
            "--server", is_flag=True, help=f"{what} a server certificate (serverAuth). This or --client is required."
        ),
        click.option(
            "--client", is_flag=True, help=f"{what} a client certificate (clientAuth). This or --server is required."
        ),
        click.option("--dns", multiple=True, metavar="NAME", help="DNS subjectAltName (repeatable)."),
        click.option("--ip", multiple=True, metavar="ADDR", help="IP subjectAltName (repeatable)."),
        click.option("--uri", multiple=True, metavar="URI", help="URI subjectAltName (repeatable)."),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _one_kind(server: bool, client: bool) -> str:
    if server == client:
        raise click.UsageError("exactly one of --server or --client is required")
    return "server" if server else "client"


@ca.command("issue", short_help="Issue a server or client certificate.")
@_dir_option
@click.argument("name")
@_kind_and_names("Issue")
@click.option("--ou", help="Organizational unit in the subject.")
@click.option("--days", type=_days, default=None, help="Validity in days [default: 365].")
@click.option(
    "--lifetime",
    metavar="DURATION",
    callback=_lifetime,
    help="Validity as a duration (30s, 15m, 24h): for short-lived certificates; instead of --days.",
)
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
    days: int | None,
    lifetime: dt.timedelta | None,
    key_type: str | None,
    force: bool,
    key_password_file: Path | None,
) -> None:
    """Issue NAME.crt and NAME.key signed by the CA. Exactly one of --server or --client
    is required.

    \b
    Example:
      tunnel ca issue --dir certs redis --server --dns redis.internal --ip 10.0.0.5
      tunnel ca issue --dir certs app1 --client --ou payments
    """
    kind = _one_kind(server, client)
    if days is not None and lifetime is not None:
        raise click.UsageError("give --days or --lifetime, not both")
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
        kind=kind,
        dns=dns,
        ips=ip,
        uris=uri,
        ou=ou,
        days=days or 365,
        lifetime=lifetime,
        force=force,
        key_type=key_type,
        key_password=key_password,
    )
    click.echo(f"wrote {crt} and {key}")


@ca.command("revoke", short_help="Revoke a certificate (re-signs crl.pem).")
@_dir_option
@click.argument("name")
def ca_revoke(directory: Path, name: str) -> None:
    """Revoke NAME.crt and re-sign the CRL (tunnels using it cut NAME's connections).

    \b
    Example:
      tunnel ca revoke --dir certs app1
    """
    serial = pki.revoke(directory, name)
    click.echo(f"revoked {name} (serial {serial:x}); wrote {directory / pki.CRL_FILE}")


@ca.command("crl", short_help="Re-sign crl.pem with a fresh next update.")
@_dir_option
def ca_crl(directory: Path) -> None:
    """Re-sign crl.pem (same revocations) with a fresh next-update time.

    \b
    Example:
      tunnel ca crl --dir certs
    """
    next_update = pki.refresh_crl(directory)
    click.echo(f"wrote {directory / pki.CRL_FILE} (next update {next_update:%Y-%m-%d})")


@ca.command("list", short_help="List issued certificates.")
@_dir_option
def ca_list(directory: Path) -> None:
    """List issued certificates: name, kind, serial, expiry, status.

    \b
    Example:
      tunnel ca list --dir certs
    """
    issued = pki.list_issued(directory)
    if not issued:
        click.echo(f"no certificates issued in {directory}")
        return
    from tunnel.status import text_table

    rows = [[c.name, c.kind, f"{c.serial:x}", f"{c.not_after:%Y-%m-%d}", c.status()] for c in issued]
    for line in text_table(["NAME", "KIND", "SERIAL", "EXPIRES", "STATUS"], rows):
        click.echo(line)


@ca.command("show", short_help="Describe a certificate, chain or CRL.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def ca_show(file: Path) -> None:
    """Describe a PEM certificate (every one of a chain file) or CRL.

    \b
    Example:
      tunnel ca show certs/redis.crt
    """
    click.echo(pki.describe(file))


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> Any:
    """`90s`, `30m`, `1h`, `2d` -> datetime.timedelta; click.BadParameter otherwise."""
    import datetime as dt

    number, unit = text[:-1], text[-1:]
    if unit not in _TTL_UNITS or not number.isdigit() or int(number) < 1:
        raise click.BadParameter(f"{text!r}: expected a positive number and s, m, h or d (e.g. 1h)")
    return dt.timedelta(seconds=int(number) * _TTL_UNITS[unit])


@ca.command("token", short_help="Make a one-time enrollment token (for `tunnel ca enroll`).")
@_dir_option
@click.argument("name")
@_kind_and_names("For")
@click.option("--days", type=_days, default=30, show_default=True, help="Validity of the certificate it enrolls.")
@click.option("--ttl", default="1h", show_default=True, help="How long the token may be used: 90s, 30m, 1h, 2d.")
def ca_token(
    directory: Path,
    name: str,
    server: bool,
    client: bool,
    dns: Sequence[str],
    ip: Sequence[str],
    uri: Sequence[str],
    days: int,
    ttl: str,
) -> None:
    """Print a token that enrolls NAME once, with exactly these SANs (a server gets
    DNS:NAME if none), before --ttl runs out. The CA directory keeps only its SHA-256
    (tokens.json, mode 0600).

    \b
    Example:
      tunnel ca token --dir certs app1 --client --ttl 1h
    """
    kind = _one_kind(server, client)
    from tunnel.ca import tokens

    lifetime = _ttl(ttl)
    token = tokens.create(directory, name, kind=kind, dns=dns, ips=ip, uris=uri, days=days, ttl=lifetime)
    click.echo(token)


@ca.command("serve", short_help="Serve the CA over HTTPS for enrollment (EST, RFC 7030).")
@_dir_option
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address to listen on (port 0: any free port).")
@click.option(
    "--cert",
    "cert_name",
    default="est",
    show_default=True,
    help="The server certificate NAME.crt/NAME.key in --dir; issued for the listen host if missing.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def ca_serve(directory: Path, listen: str, cert_name: str, log_format: str) -> None:
    """Serve /.well-known/est/cacerts, simpleenroll (with a token from `tunnel ca token`)
    and simplereenroll (with the current certificate as TLS client certificate) until
    SIGINT/SIGTERM. Every issuance is written as NAME.crt in --dir and logged.

    \b
    Example:
      tunnel ca serve --dir certs --listen 0.0.0.0:8443 --cert est
    """
    import trio

    from tunnel import logs
    from tunnel.ca import serve

    try:
        address = parse_address(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    if address.path is not None or address.host is None or address.port is None:
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
    logs.setup(log_format)
    pki._check_name(cert_name)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(lambda: serve.serve(directory, address.host or "", address.port or 0, cert_name=cert_name))


@ca.command("enroll", short_help="Get a certificate from `tunnel ca serve` with a token.")
@click.option("--url", required=True, metavar="URL", help="The CA's service: https://HOST:PORT.")
@click.option("--token", required=True, help="The token `tunnel ca token` printed.")
@click.option(
    "--ca-fingerprint",
    required=True,
    metavar="SHA256",
    help="SHA-256 of the CA's anchor certificate (`tunnel ca show DIR/ca.crt`), hex, colons allowed.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    metavar="DIR/NAME",
    help="Writes DIR/NAME.crt, DIR/NAME.key (0600) and DIR/ca.crt; NAME must be the token's.",
)
def ca_enroll(url: str, token: str, ca_fingerprint: str, out: Path) -> None:
    """Make a key here (EC P-256), check the server's CA against --ca-fingerprint, and
    have the CA certify the key with the one-time token (EST simpleenroll, RFC 7030 4.2).

    \b
    Example:
      tunnel ca enroll --url https://ca.internal:8443 --token "$TOKEN" \\
          --ca-fingerprint 3f1c...e9 --out /etc/tunnel/app1
    """
    import trio

    from tunnel.ca import enroll

    try:
        crt, key, anchor = trio.run(enroll.enroll, url, token, ca_fingerprint, out)
    except enroll.EnrollError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    click.echo(f"wrote {crt}, {key} and {anchor}")


_paths_argument = click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH...")


@main.command(short_help="Validate tunnel files and their certificates.")
@_paths_argument
def check(paths: tuple[Path, ...]) -> None:
    """Validate tunnel files and the certificates they name (exit 2 naming the file and key).

    \b
    Example:
      tunnel check /etc/tunnel/redis.yaml
      tunnel check /etc/tunnel/
    """
    from tunnel.daemon import build_states

    for state in build_states(load_paths(paths)):  # building checks the certificates too
        config = state.config
        for warning in state.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"ok: {config.source} ({config.name}: {config.mode}, listen {config.listen})")


def _address(value: str) -> Address:
    try:
        address = parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if address.is_unix:
        raise click.BadParameter("expected HOST:PORT")
    return address


def _status_addresses(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[Address]:
    """--status values, checked where click can name the option in the error."""
    return [_address(value) for value in values]


def _status_address(_ctx: click.Context, _param: click.Parameter, value: str) -> Address:
    return _address(value)


@main.command(short_help="Run tunnels until SIGTERM; SIGHUP reloads.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Log line format."
)
@click.option(
    "--status",
    "status",
    multiple=True,
    metavar="HOST:PORT",
    callback=_status_addresses,
    help="Serve /healthz, /metrics, /connections here (repeatable; besides each file's status:).",
)
@click.option("--watch-interval", type=float, default=1.0, hidden=True, help="Seconds between file checks; 0 = off.")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes sharing every listener (SO_REUSEPORT). Default: the largest `workers:` in the files, or 1.",
)
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the daemon's pid here once ready (atomically; removed at exit); `tunnel upgrade` reads it.",
)
@click.option("--worker", type=int, default=None, hidden=True, help="Run as worker N of a supervisor.")
@click.option("--worker-status", hidden=True, type=click.Path(path_type=Path), help="A worker's private status socket.")
@_paths_argument
def run(
    paths: tuple[Path, ...],
    log_format: str,
    status: list[Address],
    watch_interval: float,
    workers: int | None,
    pidfile: Path | None,
    worker: int | None,
    worker_status: Path | None,
) -> None:
    """Run every tunnel named (files, or directories of *.yaml) until SIGTERM/SIGINT, which
    stop accepting and drain open connections (a second one closes them). SIGHUP, or a change
    to any file a tunnel was configured from, reloads everything; a reload that fails keeps
    the running state and is tried again. SIGUSR2 (or `tunnel upgrade`) hands every
    listening socket to a new process started from the same command line, and drains once
    it is ready.

    \b
    Example:
      tunnel run /etc/tunnel/
      tunnel run --status 127.0.0.1:9100 --log-format json redis.yaml mariadb.yaml
    """
    import trio

    from tunnel import fd_limit, logs
    from tunnel.daemon import Daemon, build_states
    from tunnel.ticket_keys import SecretError, process_secret

    try:  # the session tickets' master secret: the one a parent passed (a worker, a hand-over), or a new one
        process_secret()
    except SecretError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    addresses = status
    configs = load_paths(paths)
    count = workers if workers is not None else max(config.workers for config in configs)
    # With several processes every line says which one wrote it.
    logs.setup(log_format, f"worker={worker}" if worker is not None else "supervisor" if count > 1 else None)
    fd_limit.raise_to_hard_limit()  # two descriptors per connection: the soft limit up to the hard one
    configs = fd_limit.fit(configs)  # and max_connections lowered if even that is short
    states = build_states(configs)
    from tunnel.upgrade import TakeOver

    # Started by `tunnel upgrade` / SIGUSR2: the sockets of the process this one replaces.
    takeover = TakeOver.from_environ() if worker is None else None
    if worker is not None:
        import os

        from tunnel.listener import HANDED_DOWN, Listeners, adopt_handed_down

        private = [Address(path=str(worker_status))] if worker_status else []
        listeners = Listeners(reuse_port=True)
        adopt_handed_down(listeners, os.environ.pop(HANDED_DOWN, ""))  # the supervisor's, for this worker
        trio.run(
            Daemon(
                paths, states, watch_interval=0, status=private, worker=True, listeners=listeners, renews=worker == 0
            ).run
        )
        return
    # Sockets systemd passed (socket activation): read, and removed from the environment, here.
    from tunnel import activation

    claimed = activation.claim(activation.listen_fds(), configs)
    activation.announce(claimed, configs)
    passed = {address: item.sock for address, item in claimed.items()}
    if takeover is not None:  # systemd's sockets, as the upgraded process had them
        passed.update({a: socks[0] for a, socks in takeover.by_address().items() if a in takeover.kept})
    if count > 1:
        from tunnel.workers import Supervisor, check_listen_addresses, check_ports_free

        check_listen_addresses(configs, passed)
        check_ports_free(
            [config for config in configs if config.listen not in passed], takeover.addresses() if takeover else ()
        )
        supervisor = Supervisor(
            paths,
            configs,
            workers=count,
            log_format=log_format,
            status=addresses,
            watch_interval=watch_interval,
            passed=passed,
            takeover=takeover,
            pidfile=pidfile,
        )
        trio.run(supervisor.run)
    else:
        from tunnel.listener import Listeners

        own = Listeners()
        for address, sock in passed.items():
            own.adopt(address, sock, keep=True)
        daemon = Daemon(
            paths,
            states,
            watch_interval=watch_interval,
            status=addresses,
            listeners=own,
            takeover=takeover,
            pidfile=pidfile,
        )
        trio.run(daemon.run)


@main.command(short_help="Upgrade a running `tunnel run` without dropping a connection.")
@click.argument("pidfile", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--pid", type=int, default=None, help="Signal this process instead (no wait for the outcome).")
@click.option(
    "--timeout",
    type=float,
    default=40.0,
    show_default=True,
    help="Seconds to wait for the new process to take over (it has 30).",
)
def upgrade(pidfile: Path | None, pid: int | None, timeout: float) -> None:
    """Send SIGUSR2 to the daemon whose pid PIDFILE holds (`tunnel run --pidfile PIDFILE`):
    it starts a new process from its own command line (the code installed now) that takes
    over every listening socket, then drains and exits. Waits until PIDFILE names the new
    process and prints both pids (exit 0), or exits 1 if the old one is still in place after
    --timeout seconds (the daemon's log says why: `upgrade failed`). With --pid PID, only
    sends the signal.

    \b
    Example:
      tunnel upgrade /run/tunnel/edge.pid
      tunnel upgrade --pid 4242
    """
    import os
    import signal
    import time

    if (pidfile is None) == (pid is None):
        raise click.UsageError("give either PIDFILE or --pid PID")
    if pid is not None:
        os.kill(pid, signal.SIGUSR2)
        click.echo(f"sent SIGUSR2 to {pid}")
        return
    assert pidfile is not None
    old = _read_pid(pidfile)
    os.kill(old, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(OSError, ValueError):
            new = int(pidfile.read_text())
            if new != old:
                click.echo(f"upgraded: pid {old} -> {new}")
                return
    click.echo(f"error: pid {old} is still the daemon after {timeout:g}s: see its log (upgrade failed)", err=True)
    raise SystemExit(EXIT_FAILURE)


def _read_pid(pidfile: Path) -> int:
    """The pid a pidfile holds; ConfigError-like usage error if it holds none."""
    try:
        return int(pidfile.read_text().strip())
    except ValueError:
        raise click.UsageError(f"{pidfile} holds no pid") from None


@main.command(short_help="Who is connected, and each tunnel's health.")
@click.argument("address", default=DEFAULT_STATUS, metavar="[HOST:PORT]", callback=_status_address)
@click.option("--health", is_flag=True, help="Print only the health (ok or unavailable); exit 0 if healthy, 1 if not.")
def status(address: Address, health: bool) -> None:
    """Who is connected now, and each tunnel's health, from a daemon's status address
    (`tunnel run --status HOST:PORT` or a file's status:). HOST:PORT defaults to
    127.0.0.1:9100.

    \b
    Example:
      tunnel status
      tunnel status 127.0.0.1:9200 --health
    """
    from tunnel.logs import escape
    from tunnel.status import StatusUnavailable, fetch, render

    where = address
    try:
        code, health_doc = fetch(where, "/healthz")
        rows = [] if health else fetch(where, "/connections")[1]["connections"]
    except StatusUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        if health:
            click.echo("unavailable")
        raise SystemExit(EXIT_FAILURE) from None
    click.echo(escape(str(health_doc.get("status", "?"))) if health else render(health_doc, rows))
    raise SystemExit(EXIT_OK if code == 200 else EXIT_FAILURE)


if __name__ == "__main__":
    main(prog_name="tunnel")
