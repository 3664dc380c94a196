#!/usr/bin/env bash
# Build the image with a real engine and run it, with the container example of docs/deploy.md:
#
#   1. Debian bookworm roots made with debootstrap stand in for the images no registry here
#      serves: python3 + python3-venv, imported under the name the Dockerfile's FROM lines
#      use (docker.io/library/python:3.11-slim-bookworm), and redis-server for the database;
#      both cached as tarballs in $TUNNEL_IMAGE_CACHE (default /var/cache/tunnel-check-image,
#      rebuilt after $MAX_AGE_DAYS days; made when absent);
#   2. `podman build` of the Dockerfile (chroot isolation, --pull=never, host network for
#      pip, which gets this machine's CA bundle and index URL through mounts that leave no
#      trace in the image);
#   3. docs/container/redis.yaml, unchanged, in the image: `tunnel check`, then the default
#      command with no network but loopback (its own namespace: no bridge), the HEALTHCHECK
#      healthy, the daemon not root, SIGTERM exit 0;
#   4. Redis and the tunnel on the host network (loopback only; listen: and target: of the
#      example moved to free ports on 127.0.0.1, nothing else): PONG through mutual TLS with
#      a client certificate, the HEALTHCHECK command prints ok, the daemon runs as UID 10001,
#      SIGTERM exit 0 with a clean log.
#
# The certificates are made with the image's own `tunnel ca`, and the tunnel gets a directory
# holding only redis.crt, redis.key, ca.crt and crl.pem (no CA key), prepared as
# docs/deploy.md says. Podman keeps its storage in a temporary directory of its own and
# touches no other container state on the machine.
#
# Needs root (rootful podman, debootstrap); installs podman, runc and debootstrap with
# apt-get. If this machine does not let root create the namespaces or cgroups a container
# needs (an unprivileged sandbox), it prints SKIP with the reason and exits 0; any other
# failure exits non-zero. `make image-check` runs it; so does .ci/run.
# Time: about 2 minutes cold (debootstrap), under a minute with the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

EXAMPLE=docs/container/redis.yaml
CACHE=${TUNNEL_IMAGE_CACHE:-/var/cache/tunnel-check-image}
MAX_AGE_DAYS=30
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REDIS_IMAGE=localhost/tunnel-check/redis:bookworm
IMAGE=localhost/tunnel-check/tunnel:latest
HARDENING=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)

# shellcheck source=scripts/steps.sh
source scripts/steps.sh # (the script has cd-ed to the repository)
skip() {
    printf 'SKIP: scripts/check-image.sh: %s\n' "$*"
    exit 0
}

((EUID == 0)) || fail "needs root (rootful podman and debootstrap): run it as root, as CI does"

# --- 0. tools ----------------------------------------------------------------------------
step "tools"
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap python3:python3 unshare:util-linux; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    echo "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
ok "$(podman --version), runc $(runc --version | sed -n 's/^runc version //p'), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"

# A container needs new mount, PID, IPC and UTS namespaces; a sandbox that forbids them to
# root forbids every engine, and that is the machine, not this repository.
if ! err=$(unshare --mount --pid --ipc --uts --fork true 2>&1); then
    skip "this machine does not let root create namespaces, so no container can run here ($err)"
fi

# Explicit limits, no higher than this shell's hard ones (runc cannot raise them): podman's
# defaults may be higher than what a sandboxed machine allows.
at_most() { if [[ $1 == unlimited ]] || (($1 > $2)); then echo "$2"; else echo "$1"; fi; }
nofile=$(at_most "$(ulimit -Hn)" 65536)
nproc=$(at_most "$(ulimit -Hu)" 4096)
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

work=$(mktemp -d /tmp/check-image.XXXXXX)
P=(podman --root "$work/storage" --runroot "$work/run" --tmpdir "$work/libpod"
    --runtime runc --cgroup-manager cgroupfs --events-backend file)
# overlay is much faster than vfs, but cannot sit on an overlay file system itself.
if grep -qw overlay /proc/filesystems && [[ $(stat -f -c %T "$work") != overlayfs ]]; then
    P+=(--storage-driver overlay)
else
    P+=(--storage-driver vfs)
fi
# podman 4.3 asks systemd for a healthcheck timer even with --health-interval disable, and
# logs an error where no systemd runs (CI): drop just those lines.
pod() { "${P[@]}" "$@" 2> >(grep -v -F 'unable to get systemd connection' >&2); }
export TMPDIR="$work/tmp" # image imports and builds stage their files there
mkdir -p "$TMPDIR"
containers=()
cleanup() {
    set +e
    for c in "${containers[@]}"; do pod rm -f -v -t 0 "$c" >/dev/null 2>&1; done
    pod rmi -a -f >/dev/null 2>&1 # not `system reset`: it would touch the machine's networks
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# --- 1. base roots -------------------------------------------------------------------------
step "base roots (debootstrap, cached in $CACHE)"
base_name=$(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' Dockerfile | grep -v -x -e build | sort -u)
[[ $(wc -l <<<"$base_name") == 1 && $base_name =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]] ||
    fail "Dockerfile: expected one base, python:X.Y-slim-SUITE; got: $base_name"
base_python=${BASH_REMATCH[1]}
suite=${BASH_REMATCH[2]}
BASE_IMAGE=docker.io/library/$base_name # exactly what the short name means, so nothing is pulled

# root_tarball NAME PACKAGES: a minbase $suite root with PACKAGES, as $CACHE/NAME.tar.
root_tarball() {
    local name=$1 packages=$2 tarball=$CACHE/$1.tar
    local args="debootstrap --variant=minbase --include=$packages $suite $MIRROR"
    if [[ -f $tarball && $(cat "$tarball.args" 2>/dev/null) == "$args" ]] &&
        [[ -z $(find "$tarball" -mtime +"$MAX_AGE_DAYS") ]]; then
        ok "$name: cached $tarball ($(date -r "$tarball" +%F))"
        return
    fi
    mkdir -p "$CACHE/debs"
    find "$CACHE/debs" -name '*.deb' -mtime +"$((2 * MAX_AGE_DAYS))" -delete
    local root=$work/root-$name started=$SECONDS
    if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" \
        "$suite" "$root" "$MIRROR" >"$work/debootstrap-$name.log" 2>&1; then
        tail -20 "$work/debootstrap-$name.log" >&2
        fail "debootstrap $name"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # An empty /etc/pip.conf: the build mounts this machine's pip settings over it (a
    # mount on a path that does not exist would leave an empty file behind in the image).
    [[ $packages != *python3-venv* ]] || : >"$root/etc/pip.conf"
    local partial
    partial=$(mktemp "$tarball.XXXXXX") # another run may be making the same tarball
    tar -C "$root" --numeric-owner -cf "$partial" .
    chmod 0644 "$partial"
    mv "$partial" "$tarball"
    printf '%s\n' "$args" >"$tarball.args"
    rm -rf "$root"
    ok "$name: debootstrap $suite with $packages in $((SECONDS - started))s, cached as $tarball"
}
root_tarball "python-$suite" python3,python3-venv,python-is-python3
root_tarball "redis-$suite" redis-server

# --- 2. images -------------------------------------------------------------------------------
step "podman: import the bases, build the image"
# What the official images set; the Dockerfile's ENV PATH="/opt/tunnel/bin:${PATH}" needs PATH.
base_env=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8')
pod import --quiet "${base_env[@]}" --change 'CMD ["python3"]' "$CACHE/python-$suite.tar" "$BASE_IMAGE" >/dev/null
pod import --quiet "${base_env[@]}" "$CACHE/redis-$suite.tar" "$REDIS_IMAGE" >/dev/null
# once ARGS...: a one-off container with no network but its own loopback, no healthcheck timer.
once() { pod run --rm --pull=never --network none --no-healthcheck "${ULIMITS[@]}" "$@"; }
if ! err=$(once "$BASE_IMAGE" true 2>&1); then
    # Only what the machine decides: namespaces or cgroups refused. Anything else is ours.
    if grep -q -i -E 'namespace|unshare|cgroup' <<<"$err"; then
        skip "podman cannot start a container on this machine: $err"
    fi
    fail "podman run of the base: $err"
fi
got_python=$(once "$BASE_IMAGE" python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $got_python == "$base_python" ]] || fail "Debian $suite has Python $got_python, the Dockerfile's base $base_python"
ok "$BASE_IMAGE: Debian $suite, Python $got_python; $REDIS_IMAGE; containers get nofile=$nofile nproc=$nproc"

# pip inside the build goes out the way pip on this machine does: its CA bundle and, if it
# has one, its index URL (http(s) only: file:// indexes are not in the container).
pip_setting() { # NAME: this machine's pip setting, from the environment or pip's own config
    local var=PIP_${1^^} value
    var=${var//-/_}
    value=${!var:-}
    if [[ -z $value ]]; then
        for pip in pip3 pip "python3 -m pip"; do
            value=$($pip config get "global.$1" 2>/dev/null) && break
            value=
        done
    fi
    printf '%s' "$value"
}
ca_bundle=$(pip_setting cert)
ca_bundle=${ca_bundle:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
[[ -f $ca_bundle ]] || fail "no CA bundle for pip at $ca_bundle"
index_url=$(pip_setting index-url)
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    [[ $index_url != http* ]] || echo "index-url = $index_url"
} >"$work/pip.conf"
build_started=$SECONDS
if ! pod build --format docker --isolation chroot --pull=never --network host "${ULIMITS[@]}" \
    --volume "$work/pip.conf:/etc/pip.conf:ro" \
    --volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro" \
    --tag "$IMAGE" . >"$work/build.log" 2>&1; then
    tail -30 "$work/build.log" >&2
    fail "podman build"
fi
version=$(once "$IMAGE" --version) || fail "tunnel --version in the image"
ok "podman build in $((SECONDS - build_started))s: $version"
# The build's mounts left nothing: the base's empty pip.conf and its own CA bundle.
traces() { once --user 0 --entrypoint sh "$1" -c 'wc -c </etc/pip.conf; sha256sum </etc/ssl/certs/ca-certificates.crt'; }
image_traces=$(traces "$IMAGE") && base_traces=$(traces "$BASE_IMAGE") || fail "reading /etc/pip.conf and the CA bundle"
[[ $image_traces == "$base_traces" ]] || fail "the image keeps the build's pip.conf or CA bundle: $image_traces"
inspect() { pod image inspect "$IMAGE" --format "$1"; }
health_cmd=$(inspect '{{range $i, $w := .Config.Healthcheck.Test}}{{if $i}}{{$w}} {{end}}{{end}}')
health_cmd=${health_cmd% }
[[ $health_cmd == "tunnel status --health "* ]] || fail "HEALTHCHECK: expected CMD tunnel status --health ..., got $health_cmd"
status_addr=${health_cmd##* }
image_cmd=$(inspect '{{join .Config.Cmd " "}}')
[[ $image_cmd == "run --status $status_addr /etc/tunnel" ]] ||
    fail "CMD ($image_cmd) does not serve the status address the HEALTHCHECK asks ($status_addr)"
image_user=$(inspect '{{.Config.User}}')
ok "no trace of the build's pip settings; HEALTHCHECK $health_cmd; CMD $image_cmd; USER $image_user"

# --- 3. certificates, as docs/deploy.md makes them ------------------------------------------------
step "certificates with the image's tunnel ca; a directory for the tunnel without the CA key"
mkdir "$work/pki"
ca() { once --user 0 -v "$work/pki:/pki" "$IMAGE" ca "$@" >/dev/null || fail "tunnel ca $*"; }
ca init --dir /pki/ca --name "check-image CA"
ca issue --dir /pki/ca redis --server --dns localhost --ip 127.0.0.1
ca issue --dir /pki/ca app1 --client
certs=$work/tunnel-certs
install -d -m 0750 -g 10001 "$certs"
install -m 0644 "$work"/pki/ca/{redis.crt,ca.crt,crl.pem} "$certs/"
install -m 0640 -g 10001 "$work/pki/ca/redis.key" "$certs/"
chmod 0755 "$work" # the tunnel file derived below is mounted from here
ok "$(cd "$certs" && stat -c '%n %A %u:%g' . * | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
mounts=(-v "$certs:/etc/tunnel/certs:ro")

# --- 4. the example unchanged, in the image ---------------------------------------------------------
step "$EXAMPLE unchanged, in the image: tunnel check, default command, HEALTHCHECK, SIGTERM"
example=(-v "$repo/$EXAMPLE:/etc/tunnel/redis.yaml:ro")
once "${HARDENING[@]}" "${example[@]}" "${mounts[@]}" --entrypoint python "$IMAGE" - <<'PY' || fail "$EXAMPLE is not made for the container"
import sys, yaml
doc = yaml.safe_load(open("/etc/tunnel/redis.yaml"))
problems = []
if not str(doc["listen"]).startswith("0.0.0.0:"):
    problems.append(f"listen {doc['listen']}: a published port needs 0.0.0.0")
for key, path in doc["tls"].items():
    if key in ("cert", "key", "ca", "crl") and not str(path).startswith("/etc/tunnel/certs/"):
        problems.append(f"tls.{key} {path} is not under /etc/tunnel/certs")
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
PY
once "${HARDENING[@]}" "${example[@]}" "${mounts[@]}" "$IMAGE" check /etc/tunnel ||
    fail "tunnel check /etc/tunnel in the container, with $EXAMPLE and the certificates mounted as docs/deploy.md says"

# wait_for NAME WHAT COMMAND...: until COMMAND succeeds, while the container runs (30s).
wait_for() {
    local name=$1 what=$2 deadline=$((SECONDS + 30))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [[ $(pod inspect --format '{{.State.Running}}' "$name") != true ]] || ((SECONDS > deadline)); then
            pod logs "$name" >&2 || true
            fail "$name: $what"
        fi
        sleep 0.3
    done
}
# expect_ok NAME CMD...: the HEALTHCHECK command, run in the container, prints ok.
expect_ok() {
    local name=$1 out
    shift
    out=$(pod exec "$name" "$@") || fail "$name: \`$*\` failed: $out"
    [[ $out == ok ]] || fail "$name: \`$*\` printed '$out', want ok"
    ok "$name: \`$*\` prints ok"
}
# not_root NAME: the container's user and its daemon process on the host are not root.
not_root() {
    local name=$1 pid uids
    [[ $(pod exec "$name" id -u) == 10001 ]] || fail "$name: id -u is not 10001"
    pid=$(pod inspect --format '{{.State.Pid}}' "$name")
    uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
    [[ $uids == "10001 10001 10001 10001" ]] || fail "$name: the daemon (host PID $pid) has UIDs $uids"
    ok "$name: id -u is 10001; the daemon, host PID $pid, has real, effective, saved and fs UIDs 10001"
}
# stop_clean NAME: SIGTERM (podman stop), then exit status 0 and no traceback in the log.
stop_clean() {
    local name=$1 started=$SECONDS code signal
    signal=$(pod inspect --format '{{.Config.StopSignal}}' "$name")
    [[ $signal == 15 || $signal == SIGTERM ]] || fail "$name: podman stop would send $signal, not SIGTERM"
    pod stop --time 45 "$name" >/dev/null
    code=$(pod inspect --format '{{.State.ExitCode}}' "$name")
    pod logs "$name" >"$work/$name.log" 2>&1
    if [[ $code != 0 ]] || grep -q -E 'Traceback|Error' "$work/$name.log"; then
        cat "$work/$name.log" >&2
        fail "$name: exit status $code after SIGTERM, or an error in its log"
    fi
    ok "$name: SIGTERM (podman stop): exit 0 after $((SECONDS - started))s, log clean; last line: $(tail -1 "$work/$name.log")"
}

name=check-image-default-$$
containers+=("$name")
pod run -d --name "$name" --pull=never --network none "${ULIMITS[@]}" "${HARDENING[@]}" \
    --health-interval disable "${example[@]}" "${mounts[@]}" "$IMAGE" >/dev/null
wait_for "$name" "HEALTHCHECK never passed" pod healthcheck run "$name"
ok "$name: podman healthcheck run: healthy (the image's CMD and HEALTHCHECK, no network but loopback)"
read -r -a health_argv <<<"$health_cmd"
expect_ok "$name" "${health_argv[@]}"
not_root "$name"
stop_clean "$name"

# --- 5. Redis and the tunnel on the host network ------------------------------------------------
step "Redis and the tunnel on the host network: PONG through mutual TLS"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
listen_port=$(free_port)
status_port=$(free_port)
redis=check-image-redis-$$
containers+=("$redis")
pod run -d --name "$redis" --pull=never --network host "${ULIMITS[@]}" "${HARDENING[@]}" --user redis --no-healthcheck \
    "$REDIS_IMAGE" redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no >/dev/null
redis_ping() {
    python3 - "$1" <<'PY'
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    s.sendall(b"PING\r\n")
    sys.exit(s.recv(64) != b"+PONG\r\n")
PY
}
wait_for "$redis" "no PONG from Redis on 127.0.0.1:$redis_port" redis_ping "$redis_port"
ok "$redis: Redis on 127.0.0.1:$redis_port (host network)"

# The example with only its two addresses moved: loopback instead of every interface, and
# Redis on the host network instead of a container named redis.
sed -e "s/^listen: 0\.0\.0\.0:6380\b/listen: 127.0.0.1:$listen_port/" \
    -e "s/^target: redis:6379\b/target: 127.0.0.1:$redis_port/" "$EXAMPLE" >"$work/redis.yaml"
changed=$(diff "$EXAMPLE" "$work/redis.yaml" | grep -c '^[<>]' || true)
[[ $changed == 4 ]] || fail "expected to change just listen: and target: in $EXAMPLE: $(diff "$EXAMPLE" "$work/redis.yaml")"
chmod 0644 "$work/redis.yaml"
tunnel=check-image-tunnel-$$
containers+=("$tunnel")
status="127.0.0.1:$status_port" # the image's $status_addr may be taken on the host network
host_health="${health_cmd% *} $status"
pod run -d --name "$tunnel" --pull=never --network host "${ULIMITS[@]}" "${HARDENING[@]}" \
    --health-cmd "$host_health" --health-interval disable \
    -v "$work/redis.yaml:/etc/tunnel/redis.yaml:ro" "${mounts[@]}" \
    "$IMAGE" run --status "$status" /etc/tunnel >/dev/null
wait_for "$tunnel" "never healthy" pod healthcheck run "$tunnel"
cp "$work/pki/ca/app1.crt" "$work/pki/ca/app1.key" "$work/pki/ca/ca.crt" "$work/"
python3 - "$listen_port" "$work" <<'PY' || fail "no PONG through the tunnel"
import socket, ssl, sys
port, work = int(sys.argv[1]), sys.argv[2]
context = ssl.create_default_context(cafile=f"{work}/ca.crt")
context.load_cert_chain(f"{work}/app1.crt", f"{work}/app1.key")
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"PING\r\n")
        got = tls.recv(64)
        print(f"ok: {tls.version()} with app1's certificate to 127.0.0.1:{port}: {got!r}")
        sys.exit(got != b"+PONG\r\n")
PY
read -r -a host_health_argv <<<"$host_health"
expect_ok "$tunnel" "${host_health_argv[@]}"
not_root "$tunnel"
stop_clean "$tunnel"
pod stop --time 10 "$redis" >/dev/null

step "done"
printf '\ntimings:\n'
printf '%s\n' "${timings[@]}"
printf 'image checks passed in %ss\n' $((SECONDS - all_start))
