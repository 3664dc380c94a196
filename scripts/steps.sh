# shellcheck shell=bash
# Shared by the check scripts (sourced): `step NAME` starts a timed step, `ok` and `fail`
# report, `finish WHAT` prints each step's time and the total.
# shellcheck disable=SC2034  # all_start and timings are read by the scripts that source this
all_start=$SECONDS
step_start=$SECONDS
timings=()
step() {
    if [[ -n ${step_name:-} ]]; then timings+=("$(printf '%4ss  %s' $((SECONDS - step_start)) "$step_name")"); fi
    step_name=$1
    step_start=$SECONDS
    printf '\n== %s\n' "$1"
}
ok() { printf 'ok: %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
