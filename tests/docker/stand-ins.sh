# shellcheck shell=bash
# Sourced by scripts/image-smoke and scripts/compose-smoke: a Docker engine,
# and local stand-ins for the images no registry here serves.
#
#   docker_up            use the running engine, or install Debian's docker.io
#                        and start dockerd (no bridge, no iptables: containers
#                        run with --network host or on user-defined networks)
#   base_images          the two images the Dockerfile names, as they are when
#                        the engine has or can pull them, else stand-ins
#                        tagged under their names:
#                          rust:1.95-slim-bookworm      builder.Dockerfile
#                          gcr.io/distroless/base-nossl-debian12:nonroot
#                                                       glibc, CA certificates,
#                                                       tzdata, /etc/passwd with
#                                                       nonroot (65532); no shell
#   services_image       docworker-ci/services (services.Dockerfile): PostgreSQL,
#                        Chroma and the embed server for the Compose stack
# Both build from docworker-ci/debian:bookworm, a debootstrap'd minimal
# bookworm from the machine's Debian mirror. Everything is cached in the
# engine; a stand-in is rebuilt when its inputs change (a label holds their
# hash).
#
# Needs root (dockerd, debootstrap). Sets DOCKER to the client to call: Debian's
# own /usr/bin/docker when present (a newer static client earlier on PATH wants
# a buildx plugin this machine lacks).

docker_dir="$repo/target/docker"
DOCKER=docker
dockerd_pid=""

di() { printf '    %s\n' "$*"; }

docker_up() {
    mkdir -p "$docker_dir"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
        echo "==> installing docker.io, docker-compose and debootstrap from Debian's packages"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
    fi
    [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "==> starting dockerd (log: $docker_dir/dockerd.log)"
        setsid dockerd --bridge=none --iptables=false >"$docker_dir/dockerd.log" 2>&1 </dev/null &
        dockerd_pid=$!
        for _ in $(seq 300); do
            "$DOCKER" info >/dev/null 2>&1 && break
            kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$docker_dir/dockerd.log" >&2; echo "dockerd exited" >&2; return 1; }
            sleep 0.1
        done
        "$DOCKER" info >/dev/null 2>&1 || { echo "dockerd did not answer within 30 s" >&2; return 1; }
    fi
    di "docker engine $("$DOCKER" version --format '{{.Server.Version}}')"
}

# Stops the dockerd docker_up started (none when one was already running).
docker_down() {
    [[ -n "$dockerd_pid" ]] || return 0
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$dockerd_pid" 2>/dev/null || true
}

image_label() { "$DOCKER" image inspect --format '{{ index .Config.Labels "org.docworker.stand-in" }}' "$1" 2>/dev/null; }
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
inputs_hash() { cat "$@" | sha256sum | cut -c1-16; }

debian_base() {
    local name=docworker-ci/debian:bookworm mirror
    have_image "$name" && return 0
    mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
    [[ -n "$mirror" ]] || mirror="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    echo "==> $name: debootstrap --variant=minbase bookworm from $mirror"
    local root="$docker_dir/bookworm-root"
    rm -rf "$root"
    debootstrap --variant=minbase --include=ca-certificates,tzdata,netbase bookworm "$root" "$mirror" \
        >"$docker_dir/debootstrap.log" 2>&1 || { tail -20 "$docker_dir/debootstrap.log" >&2; return 1; }
    # This machine's own certificate authorities (an egress proxy may sign
    # what crates.io and PyPI answer with them): what the host trusts, the
    # stand-ins trust.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$name" >/dev/null
    di "$name: $("$DOCKER" image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B"
}

# The runtime stand-in: only the files of the packages distroless/base-nossl
# is made of, taken from the debootstrap root.
distroless_stand_in() {
    local name=$1 root="$docker_dir/bookworm-root" out="$docker_dir/distroless-root"
    [[ -d "$root/var/lib/dpkg" ]] || { "$DOCKER" rmi "docworker-ci/debian:bookworm" >/dev/null 2>&1 || true; debian_base; }
    rm -rf "$out"; mkdir -p "$out"
    # Each package's files by their real path (dpkg names /lib/..., which the
    # merged /usr makes a link to usr/lib), then the links themselves and the
    # certificate bundle update-ca-certificates made.
    local list="$docker_dir/distroless.files"
    python3 - "$root" libc6 base-files netbase tzdata ca-certificates >"$list" <<'PY'
import os, sys
root, pkgs = sys.argv[1], sys.argv[2:]
seen = set()
for pkg in pkgs:
    info = next(p for p in (f"{root}/var/lib/dpkg/info/{pkg}.list", f"{root}/var/lib/dpkg/info/{pkg}:amd64.list") if os.path.exists(p))
    for line in open(info):
        full = root + line.strip()
        if not os.path.lexists(full) or (os.path.isdir(full) and not os.path.islink(full)):
            continue
        rel = os.path.relpath(os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full)), root)
        if rel not in seen:
            seen.add(rel)
            print(rel)
for rel in ("lib", "lib64", "bin", "sbin", "etc/ssl/certs/ca-certificates.crt", "etc/nsswitch.conf"):
    print(rel)
PY
    tar -C "$root" --no-recursion -c -T "$list" | tar -C "$out" -x
    mkdir -p "$out/tmp" "$out/home/nonroot" "$out/root" "$out/etc"
    chmod 1777 "$out/tmp"; chmod 700 "$out/home/nonroot" "$out/root"
    chown 65532:65532 "$out/home/nonroot"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$out/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\ntty:x:5:\n' >"$out/etc/group"
    tar -C "$out" -c . | "$DOCKER" import \
        -c 'USER 65532' -c 'WORKDIR /home/nonroot' \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        -c "LABEL org.docworker.stand-in=$2" - "$name" >/dev/null
}

builder_stand_in() {
    local name=$1 toolchain
    toolchain="$(rustc --print sysroot)"
    [[ -x "$toolchain/bin/cargo" ]] || { echo "no cargo beside rustc in $toolchain" >&2; return 1; }
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host -q -f "$repo/tests/docker/builder.Dockerfile" \
        --label "org.docworker.stand-in=$2" -t "$name" "$toolchain" >/dev/null
}

# ensure NAME HASH BUILD_FUNCTION: the public image if the engine has it (not a
# stand-in of another hash) or can pull it, else the stand-in.
ensure_image() {
    local name=$1 hash=$2 build=$3 label
    if have_image "$name"; then
        label="$(image_label "$name")"
        if [[ -z "$label" || "$label" == "$hash" ]]; then di "$name: ${label:+stand-in }present"; return 0; fi
    elif "$DOCKER" pull -q "$name" >/dev/null 2>&1; then
        di "$name: pulled"; return 0
    fi
    echo "==> $name: no registry serves it here; building a local stand-in"
    debian_base
    local t=$SECONDS
    "$build" "$name" "$hash"
    di "$name: stand-in built in $((SECONDS - t)) s, $("$DOCKER" image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B"
}

base_images() {
    local builder runtime
    builder="$(sed -n 's/^FROM \([^ ]*\) AS builder$/\1/p' "$repo/Dockerfile")"
    runtime="$(sed -n 's/^FROM \([^ ]*\)$/\1/p' "$repo/Dockerfile" | tail -1)"
    [[ -n "$builder" && -n "$runtime" ]] || { echo "cannot read the FROM lines of Dockerfile" >&2; return 1; }
    ensure_image "$builder" "$(inputs_hash "$repo/tests/docker/builder.Dockerfile" <(rustc --version))" builder_stand_in
    ensure_image "$runtime" "$(inputs_hash "$repo/tests/docker/stand-ins.sh")" distroless_stand_in
}

services_image() {
    local name=docworker-ci/services hash
    hash="$(inputs_hash "$repo"/tests/docker/{services.Dockerfile,ollama,postgres-entrypoint} \
        "$repo"/tests/services/{requirements.txt,constraints.txt,embed_server.py})"
    if [[ "$(image_label "$name")" == "$hash" ]]; then di "$name: present"; return 0; fi
    debian_base
    echo "==> $name: PostgreSQL 15, Chroma and the embed server (first time: a few minutes)"
    local t=$SECONDS
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host -q -f "$repo/tests/docker/services.Dockerfile" \
        --label "org.docworker.stand-in=$hash" -t "$name" "$repo/tests" >/dev/null
    di "$name: built in $((SECONDS - t)) s"
}
