# A stand-in for rust:1.95-slim-bookworm where no registry is reachable
# (tests/docker/stand-ins.sh tags it under that name): Debian bookworm from
# debootstrap, the C toolchain the slim image has, and the machine's own Rust
# toolchain (rustup's downloads are not reachable; bookworm's rustc is too
# old). Same paths as the real image: cargo's home at /usr/local/cargo.
FROM docworker-ci/debian:bookworm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY bin/ /usr/local/rust/bin/
COPY lib/ /usr/local/rust/lib/
COPY libexec/ /usr/local/rust/libexec/
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
