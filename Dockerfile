# syntax=docker/dockerfile:1
# aipipe: one image for the hub and the nodes (ENTRYPOINT `aipipe`; the command picks the role).
#
#   docker build -t aipipe:0.1.0 .
#   docker run --rm aipipe:0.1.0 --version
#
# No secret is baked in: admin and enrolment tokens, keys and certificates live in the home
# (a volume at /var/lib/aipipe) or come from the runtime (env file, mounted secret). The hub's
# HEALTHCHECK calls /healthz on loopback; node containers override it (deploy/compose.yaml).

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtual environment with the CPU wheel of torch and aipipe ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/aipipe
# The CPU-only wheel (no CUDA libraries), pinned to pyproject.toml's torch pin.
RUN /opt/aipipe/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aipipe ./aipipe
RUN /opt/aipipe/bin/pip install . && /opt/aipipe/bin/aipipe --version

# -- runtime: the environment only, run by a fixed non-root user -------------------------------
FROM ${PYTHON_IMAGE}
# UID/GID 10001, fixed: volumes and Kubernetes' runAsUser/fsGroup name it (deploy/).
RUN groupadd --system --gid 10001 aipipe \
 && useradd --system --uid 10001 --gid aipipe --home-dir /var/lib/aipipe \
      --no-create-home --shell /usr/sbin/nologin aipipe \
 && install -d -o aipipe -g aipipe -m 0700 /var/lib/aipipe
COPY --from=build /opt/aipipe /opt/aipipe
ENV PATH=/opt/aipipe/bin:$PATH \
    HOME=/var/lib/aipipe \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AIPIPE_HEALTH_URL=http://127.0.0.1:8700/healthz
# Homes: the hub at /var/lib/aipipe/hub, a node at /var/lib/aipipe/node (one volume each).
VOLUME ["/var/lib/aipipe"]
WORKDIR /var/lib/aipipe
# 8700: hub API (HTTPS with hub.yaml tls_cert/tls_key); 8710: a node's `serve-cds`, if used.
EXPOSE 8700 8710
USER 10001:10001
# The hub's liveness: /healthz on loopback. With TLS set AIPIPE_HEALTH_URL=https://127.0.0.1:8700/
# healthz; the probe sends nothing secret, so it does not check the certificate's name.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, ssl, sys, urllib.request as u; r = u.urlopen(os.environ['AIPIPE_HEALTH_URL'], timeout=4, context=ssl._create_unverified_context()); sys.exit(0 if r.status == 200 else 1)"]
ENTRYPOINT ["aipipe"]
CMD ["--help"]
