# syntax=docker/dockerfile:1
#
# One image for the programs of research-operator, all on PATH:
#   research-operator     the kopf operator (the image's ENTRYPOINT)
#   research-worker       a worker step (plan, interview, write); the operator sets it as the
#                         command of every worker Job
#   research-modelserver  the offline OpenAI-compatible model server
#   kubectl-research      the kubectl plugin (kubectl research ...)
# Only the product: the packages of pyproject.toml (api, operator, worker, modelserver, cli). The
# local control plane, node agent and demo (devcluster/) are a development distribution of their
# own and are neither copied nor installed here.
# The Helm chart always sets `command` explicitly, so the ENTRYPOINT only matters for `docker run`.
#
#   docker build -t research-operator:0.1.0 .      (or: make image)
#
# Without a Docker engine `make image` builds this file with buildah from a Debian base assembled
# by hack/build-image.sh and passed as PYTHON_IMAGE (docs/development.md, "The image").
#
# The base image is pinned by tag to a full Python version of the minor version the project is
# tested on (3.11; the development venv runs 3.11.7). For reproducible builds
# pin it by digest as well, e.g. --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest>
# (docker buildx imagetools inspect python:3.11.7-slim-bookworm prints the digest).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- builder: build the project wheel and install it with its dependencies into /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel is built from (see .dockerignore): the project metadata and the packages.
COPY pyproject.toml ./
COPY api ./api
COPY operator ./operator
COPY worker ./worker
COPY modelserver ./modelserver
COPY cli ./cli
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/research_operator-*.whl \
 && /opt/venv/bin/research-operator --help >/dev/null \
 && /opt/venv/bin/research-worker --help >/dev/null \
 && /opt/venv/bin/research-modelserver --help >/dev/null \
 && /opt/venv/bin/kubectl-research --help >/dev/null

# ---- final: the interpreter of the same base image plus the venv; no compilers, no sources ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="research-operator" \
      org.opencontainers.image.description="Multi-agent LLM research as a Kubernetes operator: operator, worker, offline model server and kubectl plugin" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=builder /opt/venv /opt/venv
# A numeric non-root user (65532, as in distroless "nonroot"), so runAsNonRoot can verify it.
# The root filesystem can be read-only: nothing is written outside /tmp.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081 8000
ENTRYPOINT ["research-operator"]
