# shellcheck shell=bash
# Sourced by scripts/demo, scripts/image-smoke and scripts/compose-smoke: a
# scratch directory removed on exit, processes stopped on exit, and the test
# services (a throwaway PostgreSQL, Chroma, the embedding server) on free
# ports of 127.0.0.1. Set `repo` and `me` (the script's name) first; a script
# may define `on_exit`, called before the processes stop.

step() { printf '==> %s\n' "$*"; }
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }
# The last lines of a log, indented, for failure messages.
tail_of() { echo "--- last lines of $1:" >&2; tail -n "${2:-25}" "$1" | sed 's/^/    /' >&2; }

venv="${DOCWORKER_TEST_VENV:-$repo/target/test-venv}"
model="all-minilm"   # what tests/services/embed_server.py serves
started=$SECONDS

# --- what this machine must have ------------------------------------------------
command -v python3 >/dev/null || die "python3 not found: apt-get install python3 python3-venv python3-pip"
bindir=""
if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
    bindir="$(pg_config --bindir)"
else
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/initdb" ]] && { bindir="$d"; break; }
    done
fi
[[ -n "$bindir" ]] || die "PostgreSQL server binaries (initdb) not found: apt-get install postgresql"
psql="$bindir/psql"
[[ -x "$psql" ]] || psql="$(command -v psql)" || die "psql not found: apt-get install postgresql-client"
as_postgres=()
if [[ "$(id -u)" == 0 ]]; then   # initdb refuses to run as root
    id postgres >/dev/null 2>&1 || die "running as root needs a postgres user to run PostgreSQL as (apt-get install postgresql makes one)"
    as_postgres=(runuser -u postgres --)
fi

# --- cleanup, whatever happens --------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/docworker-$me.XXXXXX")"
chmod 755 "$tmp"
pids=()
cleanup() {
    local code=$?
    set +e
    trap - INT TERM
    declare -F on_exit >/dev/null && on_exit "$code"
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null
    done
    if [[ -f "$tmp/pg/data/postmaster.pid" ]]; then
        "${as_postgres[@]}" "$bindir/pg_ctl" -D "$tmp/pg/data" -m fast -w stop >/dev/null 2>&1
    fi
    rm -rf "$tmp"
    if (( code == 0 )); then
        echo "Done in $((SECONDS - started)) s; everything it started is stopped and removed."
    elif (( code == 130 )); then
        echo "$me interrupted; everything it started is stopped and removed." >&2
    else
        echo "$me failed (exit $code); everything it started is stopped and removed." >&2
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Starts a command in its own process group (so cleanup stops all of it), output to a log.
spawn() { local log=$1; shift; setsid "$@" </dev/null >"$log" 2>&1 & pids+=($!); }
# Waits until URL answers 200, or the process (pid) dies, or 60 s pass.
wait_http() {
    local url=$1 pid=$2 log=$3
    for _ in $(seq 600); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$url" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { tail_of "$log"; die "it exited"; }
        sleep 0.1
    done
    tail_of "$log"; die "no answer from $url within 60 s"
}

# tests/services/setup: the virtualenv with Chroma and the embedding model.
services_venv() {
    step "Python services: Chroma and the embedding model (tests/services/setup; about a minute the first time)"
    local t=$SECONDS
    DOCWORKER_TEST_VENV="$venv" bash "$repo/tests/services/setup" >"$tmp/setup.log" 2>&1 \
        || { tail_of "$tmp/setup.log" 40; die "tests/services/setup failed"; }
    echo "    venv ready in $((SECONDS - t)) s: $venv"
    export ANONYMIZED_TELEMETRY=False HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NO_COLOR=1
}

# Sets pg_port and DATABASE_URL (the superuser postgres, trust).
start_postgres() {
    pg_port="$(free_port)"
    step "PostgreSQL $("$bindir/postgres" --version | sed -E 's/^[^0-9]*([0-9.]+).*/\1/') on 127.0.0.1:$pg_port"
    mkdir -p "$tmp/pg"
    [[ ${#as_postgres[@]} -gt 0 ]] && chown -R postgres:postgres "$tmp/pg"
    "${as_postgres[@]}" "$bindir/initdb" -D "$tmp/pg/data" -U postgres --auth=trust -E UTF8 --no-sync \
        >"$tmp/pg/initdb.log" 2>&1 || { tail_of "$tmp/pg/initdb.log"; die "initdb failed"; }
    "${as_postgres[@]}" "$bindir/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/server.log" -w -t 60 \
        -o "-p $pg_port -k $tmp/pg -c listen_addresses=127.0.0.1" start >/dev/null \
        || { tail_of "$tmp/pg/server.log"; die "PostgreSQL did not start"; }
    export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
}
stop_postgres() { "${as_postgres[@]}" "$bindir/pg_ctl" -D "$tmp/pg/data" -m fast -w stop >/dev/null; }
resume_postgres() {
    "${as_postgres[@]}" "$bindir/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/server.log" -w -t 60 \
        -o "-p $pg_port -k $tmp/pg -c listen_addresses=127.0.0.1" start >/dev/null \
        || { tail_of "$tmp/pg/server.log"; die "PostgreSQL did not start again"; }
}

# Sets chroma_url.
start_chroma() {
    local port; port="$(free_port)"
    chroma_url="http://127.0.0.1:$port"
    step "Chroma on $chroma_url"
    spawn "$tmp/chroma.log" "$venv/bin/chroma" run --path "$tmp/chroma" --host 127.0.0.1 --port "$port"
    wait_http "$chroma_url/api/v2/heartbeat" "${pids[-1]}" "$tmp/chroma.log"
}

# start_embed [NAME]: sets embed_url (and embed_pid).
start_embed() {
    local log="$tmp/${1:-embed}.log"
    step "Embedding server (all-MiniLM-L6-v2 in Ollama's API, model \"$model\")"
    spawn "$log" "$venv/bin/python" "$repo/tests/services/embed_server.py" --host 127.0.0.1 --port 0
    embed_pid="${pids[-1]}"
    embed_url=""
    for _ in $(seq 600); do
        embed_url="$(sed -n 's/^embed server listening on \(http:[^ ]*\).*/\1/p' "$log")"
        [[ -n "$embed_url" ]] && break
        kill -0 "$embed_pid" 2>/dev/null || { tail_of "$log"; die "the embedding server exited"; }
        sleep 0.1
    done
    [[ -n "$embed_url" ]] || { tail_of "$log"; die "the embedding server did not start within 60 s"; }
    echo "    listening on $embed_url"
}
