"""Results of a benchmark run → docs/benchmark.md (tables), .png (ratio chart), .json (raw).

`python bench/report.py DIR` renders DIR/benchmark.md and .png again from DIR/benchmark.json
(after a change to the presentation; nothing is measured)."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import ssl
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

X = "\N{MULTIPLICATION SIGN}"


@dataclass
class Results:
    settings: dict[str, Any]
    measures: list[str]
    workers: bool  # `tunnel run --workers` exists
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, key: str, peer: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(peer, []).append(float(value))

    def median(self, key: str, peer: str) -> float | None:
        runs = self.values.get(key, {}).get(peer)
        return statistics.median(runs) if runs else None

    def ratio(self, key: str, peer: str, base: str = "stunnel4") -> float | None:
        ours, theirs = self.median(key, peer), self.median(key, base)
        if ours is None or not theirs:
            return None
        return ours / theirs


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_better: bool
    target: float | None = None
    peer: str = "tunnel"  # the column compared with stunnel4
    short: str = ""  # for the chart


def main_rows(settings: dict[str, Any]) -> list[Row]:
    size, mib = settings["latency_size"], settings["bulk_mib"]
    return [
        Row("bulk", f"Bulk throughput, one {mib} MiB transfer through a pair", "MiB/s", True, 1.0, short="bulk"),
        Row("hs_full", "Full mTLS handshakes/s at a server", "/s", True, 1.25, short="full handshakes/s"),
        Row(
            "hs_full",
            "Full mTLS handshakes/s at a server, `tunnel run --workers 2`",
            "/s",
            True,
            None,
            peer="tunnel-w2",
            short="full handshakes/s, 2 workers",
        ),
        Row("hs_resumed", "Resumed handshakes/s (TLS 1.3 tickets)", "/s", True, 1.0, short="resumed handshakes/s"),
        Row("hs_full_server_ms", "Server CPU per full handshake", "ms", False, short="CPU per full handshake"),
        Row("lat_pair_p50", f"Round trip of {size} B through a pair, p50", "µs", False, short="pair p50 latency"),
        Row("lat_pair_p99", f"Round trip of {size} B through a pair, p99", "µs", False, short="pair p99 latency"),
        Row("lat_server_p50", f"Round trip of {size} B through a server (TLS client), p50", "µs", False),
        Row("lat_server_p99", f"Round trip of {size} B through a server (TLS client), p99", "µs", False),
        Row("lat_pair_cpu_us", "CPU of both tunnels per round trip through a pair", "µs", False),
        Row("mem_per_conn_kib", "Memory per idle authenticated connection", "KiB", False, 0.5, short="memory/conn"),
        Row("redis_set", "redis-benchmark SET through a pair", "req/s", True, short="redis SET"),
        Row("redis_get", "redis-benchmark GET through a pair", "req/s", True, short="redis GET"),
        Row("pgbench_tps", "pgbench -S through a pair (protocol postgres)", "tps", True, short="pgbench -S"),
    ]


@dataclass(frozen=True)
class Target:
    """A round-two target set against another reference than stunnel4: `peer`'s median of
    `key` divided by the reference, against `target` (issue 18: the per-connection cost
    against nginx, the per-message cost against the trio floor, which is Python's). The
    reference is `reference`'s median of `reference_key` (default: `key`), or `constant`
    when no reference peer is named."""

    key: str
    label: str
    reference: str
    higher_better: bool
    target: float | None  # None: stated, no target
    peer: str = "tunnel"
    reference_key: str = ""
    constant: float = 100.0


def targets(settings: dict[str, Any]) -> list[Target]:
    total = settings.get("scale_total", 10_000)
    return [
        Target("hs_full_server_ms", "Server CPU per full handshake, tunnel ÷ nginx", "nginx", False, 1.0),
        Target("hs_full", "Full handshakes/s, tunnel ÷ stunnel4", "stunnel4", True, 1.25),
        Target("lat_pair_cpu_us", "CPU per round trip through a pair, tunnel ÷ trio-floor", "trio-floor", False, 1.10),
        Target("lat_pair_p50", "Round trip through a pair, p50, tunnel ÷ trio-floor", "trio-floor", False, 1.10),
        Target("redis_get", "redis-benchmark GET through a pair, tunnel ÷ trio-floor", "trio-floor", True, 0.85),
        Target("redis_set", "redis-benchmark SET through a pair, tunnel ÷ trio-floor", "trio-floor", True, 0.85),
        Target("hs_resumed_resumed_pct", "`--workers 2`: handshakes resumed, % ÷ 100", "", True, 0.99, "tunnel-w2"),
        Target("hs_full", "`--workers 2`: full handshakes/s ÷ one process", "tunnel", True, None, "tunnel-w2"),
        Target("hs_resumed", "`--workers 2`: resumed handshakes/s ÷ one process", "tunnel", True, None, "tunnel-w2"),
        Target("scale_held", f"Idle authenticated connections held ÷ {total:,}", "", True, 1.0, constant=total),
        Target(
            "scale_mem_per_conn_kib",
            f"Memory per connection with {total:,} held, tunnel ÷ stunnel4",
            "stunnel4",
            False,
            0.35,
        ),
        Target(
            "scale_hs_p50_held_ms",
            f"New handshake latency, p50, {total:,} held ÷ none held",
            "tunnel",
            False,
            1.5,
            reference_key="scale_hs_p50_none_ms",
        ),
        Target(
            "scale_hs_p99_held_ms",
            f"New handshake latency, p99, {total:,} held ÷ none held",
            "tunnel",
            False,
            1.5,
            reference_key="scale_hs_p99_none_ms",
        ),
    ]


def _targets_table(results: Results) -> list[str]:
    lines = ["| target | tunnel | reference | ratio | target: met? |", "|---|---:|---:|---:|---|"]
    for t in targets(results.settings):
        ours = results.median(t.key, t.peer)
        theirs = results.median(t.reference_key or t.key, t.reference) if t.reference else t.constant
        if ours is None or not theirs:
            continue
        ratio = ours / theirs
        sign = "≥" if t.higher_better else "≤"
        if t.target is None:
            verdict = "— (stated)"
        else:
            met = ratio >= t.target if t.higher_better else ratio <= t.target
            verdict = f"{sign} {t.target}{X}: **{'yes' if met else 'NO'}**"
        lines.append(f"| {t.label} | {_fmt(ours)} | {_fmt(theirs)} | {ratio:.2f}{X} | {verdict} |")
    return lines if len(lines) > 2 else []


SERVER_ROWS = [
    ("hs_full", "Full handshakes/s", "{:.0f}"),
    ("hs_full_server_ms", "server CPU per full handshake (ms)", "{:.2f}"),
    ("hs_full_server_cores", "server CPU used during the full-handshake run (cores)", "{:.2f}"),
    ("hs_full_loadgen_cores", "load generator CPU during it (cores, max 1)", "{:.2f}"),
    ("hs_resumed", "Resumed handshakes/s", "{:.0f}"),
    ("hs_resumed_server_ms", "server CPU per resumed handshake (ms)", "{:.2f}"),
    ("hs_resumed_loadgen_cores", "load generator CPU during it (cores, max 1)", "{:.2f}"),
    ("hs_resumed_resumed_pct", "handshakes actually resumed (%)", "{:.0f}"),
    ("lat_server_p50", "64 B round trip, p50 (µs)", "{:.0f}"),
    ("lat_server_p99", "64 B round trip, p99 (µs)", "{:.0f}"),
    ("lat_server_cpu_us", "server CPU per round trip (µs)", "{:.1f}"),
    ("mem_per_conn_kib", "memory per idle connection (KiB)", "{:.1f}"),
    ("mem_idle_mib", "memory idle (MiB)", "{:.1f}"),
]

SCALE_ROWS = [
    ("scale_held", "idle authenticated connections held", "{:,.0f}"),
    ("scale_failed", "refused or failed of those", "{:,.0f}"),
    ("scale_hold_s", "seconds to open them (50 at a time)", "{:.0f}"),
    ("scale_mem_per_conn_kib", "memory per connection (KiB)", "{:.1f}"),
    ("scale_hs_p50_none_ms", "new handshake, p50, none held (ms)", "{:.2f}"),
    ("scale_hs_p50_held_ms", "new handshake, p50, all held (ms)", "{:.2f}"),
    ("scale_hs_p99_none_ms", "new handshake, p99, none held (ms)", "{:.2f}"),
    ("scale_hs_p99_held_ms", "new handshake, p99, all held (ms)", "{:.2f}"),
    ("scale_hs_failed_held", "new handshakes failed while held", "{:,.0f}"),
    ("scale_workers", "processes (tunnel: --workers)", "{:.0f}"),
    ("scale_file_limit", "file descriptor limit per process (hard)", "{:,.0f}"),
]

DIRECT_ROWS = [
    ("bulk", "Bulk throughput (MiB/s)", "{:.0f}"),
    ("lat_pair_p50", "64 B round trip, p50 (µs)", "{:.0f}"),
    ("lat_pair_p99", "64 B round trip, p99 (µs)", "{:.0f}"),
    ("lat_pair_cpu_us", "CPU of both forwarders per round trip (µs)", "{:.0f}"),
    ("redis_set", "redis-benchmark SET (req/s)", "{:.0f}"),
    ("redis_get", "redis-benchmark GET (req/s)", "{:.0f}"),
    ("pgbench_tps", "pgbench -S (tps)", "{:.0f}"),
]


# ----------------------------------------------------------------------------- machine


def _first_line(argv: list[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (out.stdout + out.stderr).splitlines()
    for line in lines:
        if re.search(pattern, line):
            return line.strip()
    return lines[0].strip() if lines else ""


def machine_info(root: Path) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "tunnel"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": _first_line(["nproc"]),
        "cpu_model": cpu_model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "system_openssl": _first_line(["openssl", "version"]),
        "trio": metadata.version("trio"),
        "stunnel4": _first_line(["stunnel4", "-version"], r"^stunnel \d"),
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "redis": _first_line(["redis-server", "--version"]),
        "pgbench": _first_line(["pgbench", "--version"]),
        "gcc": _first_line(["gcc", "--version"]),
        "git": f"{commit}{' + uncommitted changes in tunnel/' if dirty else ''}",
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _verdict(row: Row, ratio: float | None) -> str:
    if row.target is None:
        return "—"
    sign = "≥" if row.higher_better else "≤"
    if ratio is None:
        return f"{sign} {row.target}{X}: not measured"
    met = ratio >= row.target if row.higher_better else ratio <= row.target
    return f"{sign} {row.target}{X}: **{'yes' if met else 'NO'}**"


def _main_table(results: Results) -> list[str]:
    lines = [
        "| measure | tunnel | stunnel4 | ratio | target: met? |",
        "|---|---:|---:|---:|---|",
    ]
    for row in main_rows(results.settings):
        if row.peer == "tunnel-w2" and not results.workers:
            lines.append(
                f"| {row.label} | **TODO**: `tunnel run --help` shows no `--workers` yet; "
                "this row is measured once it does | | | "
                f"{'≥' if row.higher_better else '≤'} {row.target}{X} |"
            )
            continue
        ours, theirs = results.median(row.key, row.peer), results.median(row.key, "stunnel4")
        if ours is None and theirs is None:
            continue
        ratio = results.ratio(row.key, row.peer)
        arrow = "higher is better" if row.higher_better else "lower is better"
        lines.append(
            f"| {row.label} ({row.unit}, {arrow}) | {_fmt(ours)} | {_fmt(theirs)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}{X}'} | {_verdict(row, ratio)} |"
        )
    return lines


def _misses(results: Results) -> list[str]:
    """The targets missed, worst first (by how far the ratio is from its target)."""
    missed = []
    for row in main_rows(results.settings):
        ratio = results.ratio(row.key, row.peer)
        if row.target is None or ratio is None or (row.peer == "tunnel-w2" and not results.workers):
            continue
        shortfall = row.target / ratio if row.higher_better else ratio / row.target
        if shortfall > 1:
            missed.append((shortfall, f"- {row.label}: {ratio:.2f}{X} (target {row.target}{X})"))
    return [line for _, line in sorted(missed, reverse=True)] or ["- none"]


def _peer_table(results: Results, rows: list[tuple[str, str, str]], peers: list[str], ratios: bool) -> list[str]:
    peers = [p for p in peers if any(results.median(k, p) is not None for k, _, _ in rows)]
    if not peers:
        return []
    lines = ["| | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
    for key, label, fmt in rows:
        if all(results.median(key, p) is None for p in peers):
            continue
        cells = []
        for peer in peers:
            value = results.median(key, peer)
            ratio = results.ratio(key, peer)
            cell = "—" if value is None else fmt.format(value)
            if ratios and ratio is not None and peer != "stunnel4" and value is not None:
                cell += f" ({ratio:.2f}{X})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _raw(results: Results) -> list[str]:
    lines = []
    for key, per_peer in results.values.items():
        parts = []
        for peer, runs in per_peer.items():
            parts.append(f"{peer} [{', '.join(_fmt(v) for v in runs)}]")
        lines.append(f"- `{key}`: " + "; ".join(parts))
    return lines


def markdown(results: Results, info: dict[str, Any]) -> str:
    s = results.settings
    server_peers = ["tunnel", "tunnel-w2", "stunnel4", "nginx", "haproxy"]
    out = [
        "# Benchmark: tunnel against stunnel4 (and nginx, HAProxy)",
        "",
        "Generated by `make bench` (`bench/run.py`); do not edit by hand. What each number means and",
        "how it is measured: [bench/README.md](../bench/README.md).",
        "",
        f"{s['rounds']} alternating round(s) per measure (tunnel, stunnel4, ..., tunnel, stunnel4, ...);",
        "every number is the **median** of the rounds; ratios are tunnel ÷ stunnel4 of those medians.",
        "Every peer runs mutual TLS, TLS 1.3 only, with an ECDSA P-256 CA, the client certificate",
        "required and verified, on 127.0.0.1 in front of the same C epoll target.",
        "",
        "## tunnel against stunnel4",
        "",
        *_main_table(results),
        "",
        "Targets missed, furthest first:",
        "",
        *_misses(results),
        "",
    ]
    targets = _targets_table(results)
    if targets:
        out += [
            "## Round-two targets",
            "",
            "Set where the work is ours: the CPU a handshake costs against nginx's, and what each",
            "relayed message costs against `trio-floor` (bare trio forwarders: Python's own floor,",
            "see the reference table below). The earlier targets against stunnel4 for small",
            f"messages (pair p50 ≤ 1.3{X}, redis-benchmark ≥ 1.0{X}) are retired: no Python tunnel",
            "reaches them, the floor itself does not. `trio-floor` carries no TLS: what OpenSSL costs",
            "per message is in `trio-tls-floor` (the same forwarders with mutual TLS between them),",
            "in the reference table below.",
            "",
            *targets,
            "",
        ]
    table = _peer_table(results, SERVER_ROWS, server_peers, ratios=True)
    if table:
        out += [
            "## Server side: tunnel, stunnel4, nginx, HAProxy",
            "",
            "A TLS client (`bench/hsload.c`) talks to each server directly; in brackets the ratio to",
            "stunnel4. nginx runs 2 worker processes (one per core, `reuseport`), HAProxy its default",
            "of one thread per core, stunnel4 one thread per connection, tunnel one process",
            "(`tunnel-w2`: `--workers 2`, when the tunnel has it).",
            "",
            *table,
            "",
        ]
    table = _peer_table(results, SCALE_ROWS, ["tunnel", "stunnel4"], ratios=False)
    if table:
        total = s.get("scale_total", 10_000)
        out += [
            f"## {total:,} idle connections at a server",
            "",
            f"`bench/hsload.c hold` opens {total:,} mutual-TLS connections (50 at a time), each with a",
            "1-byte echo through to the target, and keeps them open; memory per connection is the",
            "server's resident memory (all its processes) with them held, less before, divided by",
            "those held. New clients connect one at a time (full handshake and a 1-byte echo each)",
            f"for {s.get('scale_seconds', '?')} s before and while they are held. Every peer has the same",
            "connection cap (12,000) and the file limit of the machine. Each relayed connection",
            "needs two descriptors: where the hard limit per process is short of that (raising it",
            "needs CAP_SYS_RESOURCE), the tunnel runs `--workers 2`, each worker holding about half;",
            "stunnel4 has no such mode and holds what its limit allows; at that limit it serves no",
            "new client (— below).",
            "",
            *table,
            "",
        ]
    table = _peer_table(
        results,
        DIRECT_ROWS,
        ["direct", "epoll-floor", "trio-floor", "trio-tls-floor", "tunnel", "stunnel4"],
        ratios=False,
    )
    if table:
        out += [
            "## For reference: no tunnel at all, and the event loop's floor",
            "",
            "`direct`: the same client straight to the target (plaintext), in the same rounds.",
            "`trio-floor`: a pair of bare trio forwarders (`bench/trio_forward.py`: plain TCP, no",
            "TLS, no logging, relaying as the tunnel does) in place of the tunnel pair: what the",
            "event loop alone costs per relayed message, the floor under the tunnel's latency.",
            "`epoll-floor`: the same in plain CPython on one `select.epoll` loop, no trio",
            "(`bench/epoll_forward.py`): when it is no faster than `trio-floor`, the floor is Python's.",
            "`trio-tls-floor`: the trio floor with mutual TLS between the two forwarders (the stdlib's",
            "SSLObject over memory BIOs, the tunnel's certificates, nothing else): the floor of a TLS",
            "tunnel on trio, which the `trio-floor` targets above leave out.",
            "",
            *table,
            "",
        ]
    out += [
        "## How it was run",
        "",
        f"- Date: {info['date']}; duration of the run: {info.get('duration_s', '?')} s",
        f"- Machine: `nproc` = {info['nproc']}, CPU: {info['cpu_model']}, kernel: {info['kernel']}",
        f"- Load average before / after: {' '.join(info['loadavg_before'])} / "
        f"{' '.join(info.get('loadavg_after', ['?']))} (the machine is shared: other jobs may have run)",
        f"- tunnel: git {info['git']}; Python {info['python']} ({info['python_openssl']}), trio {info['trio']}",
        f"- {info['stunnel4']}; {info['nginx']}; {info['haproxy']}; {info['redis']}; {info.get('pgbench', '')}",
        f"- Load generator and target: C, {info['gcc']}, against the system {info['system_openssl']}",
        f"- Sizes: bulk {s['bulk_mib']} MiB; handshakes {s['hs_seconds']} s per run with {s['hs_conns']} "
        f"concurrent connections; latency {s['latency_rounds']} round trips of {s['latency_size']} B after 200 "
        f"warm-up ones; memory {s['hold']} connections held; scale {s.get('scale_total', '?')} held; "
        f"redis-benchmark -n {s['redis_requests']} "
        f"-c {s['redis_clients']}; pgbench -S -T {s.get('pgbench_seconds', '?')} -c {s.get('pgbench_clients', '?')} "
        "-j 2 (scale 1)",
        "- The handshake load generator is one thread pinned to the last CPU; the servers are not",
        "  pinned. With 2 cores the generator shares the machine with the server it measures: the",
        "  server-side table says how much CPU each took. A full TLS 1.3 mTLS handshake costs the",
        "  client about as much as the server (ECDHE, one signature, two verifications), so when",
        "  the generator is near 1.00 core, the server may have had capacity left: that rate is a",
        "  lower bound. `server CPU per handshake` does not depend on that.",
        "- Logging: tunnel (2 lines per connection) and stunnel4 (its default level 5, about 4",
        "  lines) log every connection to a file; nginx writes one access-log line per session and",
        "  HAProxy one `option tcplog` line (to stdout, a file).",
        "",
        "## Every run",
        "",
        *_raw(results),
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- chart


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import NullLocator

    colours = {"tunnel": "#2b7bba", "tunnel-w2": "#5fa8d3", "nginx": "#999999", "haproxy": "#cccccc"}
    rows: list[tuple[str, Row, list[tuple[str, float]]]] = []
    for row in main_rows(results.settings):
        if not row.short:
            continue
        peers = [row.peer] + (["nginx", "haproxy"] if row.peer == "tunnel" else [])
        bars = [(p, r) for p in peers if (r := results.ratio(row.key, p)) is not None]
        if bars:
            arrow = "↑" if row.higher_better else "↓"
            rows.append((f"{row.short} {arrow}", row, bars))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 0.55 * sum(len(b) for _, _, b in rows) + 1.6))
    y = 0.0
    ticks, labels = [], []
    used: set[str] = set()
    for label, row, bars in reversed(rows):
        start = y
        for peer, ratio in reversed(bars):
            if peer == row.peer and row.target is not None:
                ax.plot([row.target] * 2, [y - 0.5, y + 0.5], color="black", linestyle="--", linewidth=1.2, zorder=5)
            colour = colours.get(peer, "#888888")
            if peer == row.peer and row.target is not None:
                met = ratio >= row.target if row.higher_better else ratio <= row.target
                colour = "#3a9a4a" if met else "#d04a3a"
            ax.barh(y, ratio, height=0.8, color=colour, label=None if peer in used else peer)
            if peer not in ("tunnel", "tunnel-w2"):
                used.add(peer)
            ax.text(ratio * 1.03, y, f"{ratio:.2f}{X} {peer}", va="center", fontsize=8, backgroundcolor="white")
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(label)
        y += 0.6
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    values = [r for _, _, bars in rows for _, r in bars] + [r.target for _, r, _ in rows if r.target]
    low = min(min(values), 1.0) / 1.5
    high = max(max(values), 1.0) * 2.2
    ax.set_xlim(low, high)
    xt = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20) if low <= t <= high]
    ax.set_xticks(xt, [f"{t:g}{X}" for t in xt])
    ax.set_yticks(ticks, labels)
    ax.set_xlabel(f"ratio to stunnel4 (log scale; 1{X} = stunnel4; ↑ higher is better, ↓ lower is better)")
    ax.set_title("tunnel vs stunnel4 (medians). Green/red: tunnel meets/misses its target (dashed line)", fontsize=10)
    handles = [
        Rectangle((0, 0), 1, 1, color=c)
        for c in ("#3a9a4a", "#d04a3a", colours["tunnel"], colours["nginx"], colours["haproxy"])
    ]
    ax.legend(
        handles,
        ["tunnel, target met", "tunnel, target missed", "tunnel, no target", "nginx", "haproxy"],
        fontsize=8,
        loc="lower right",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Results, info: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(
        json.dumps(
            {"machine": info, "settings": results.settings, "workers": results.workers, "values": results.values},
            indent=1,
        )
        + "\n"
    )
    (out / "benchmark.md").write_text(markdown(results, info))
    chart(results, out / "benchmark.png")


def rerender(out: Path) -> None:
    saved = json.loads((out / "benchmark.json").read_text())
    results = Results(saved["settings"], [], saved["workers"], saved["values"])
    write_report(results, saved["machine"], out)


if __name__ == "__main__":
    rerender(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
