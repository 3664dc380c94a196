# tunnel: the mutual-TLS tunnel daemon in a small image. Usage: docs/deploy.md, "Docker".
#
#   docker build -t tunnel .
#   docker run -d --name tunnel-redis --network redis-net --stop-timeout 45 -p 6380:6380 \
#       --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#       -v "$PWD/docs/container/redis.yaml:/etc/tunnel/redis.yaml:ro" \
#       -v "$PWD/tunnel-certs:/etc/tunnel/certs:ro" tunnel
#
# docs/container/redis.yaml is made for the container (listens on 0.0.0.0, names its files
# under /etc/tunnel/certs); tunnel-certs/ holds only redis.crt, redis.key, ca.crt and
# crl.pem, never the CA key. scripts/check-image.sh builds this file with podman and runs
# the image so, beside Redis; scripts/check-deploy.sh lints it with hadolint.

# --- build: the package and its dependencies in a virtualenv at /opt/tunnel ----------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY tunnel ./tunnel
RUN python -m venv /opt/tunnel \
    && /opt/tunnel/bin/pip install --no-cache-dir /src \
    && /opt/tunnel/bin/tunnel --version

# --- runtime: the same Python, the virtualenv, a non-root user ----------------------
FROM python:3.11-slim-bookworm
COPY --from=build /opt/tunnel /opt/tunnel
ENV PATH="/opt/tunnel/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed UID/GID (10001) so that the mounted private key can be made readable to it:
# the certificate directory root:10001 0750, the key root:10001 0640 (docs/deploy.md).
RUN groupadd --system --gid 10001 tunnel \
    && useradd --system --no-log-init --uid 10001 --gid tunnel \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin tunnel \
    && mkdir -p /etc/tunnel/certs
# The tunnel files (*.yaml). Certificates go in /etc/tunnel/certs, mounted read-only.
VOLUME ["/etc/tunnel"]
USER 10001:10001
# A typical server tunnel port (Redis behind TLS); publish whatever your tunnel files use.
EXPOSE 6380
# Asks the daemon itself: healthy only while every tunnel is listening.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["tunnel", "status", "--health", "127.0.0.1:9100"]
ENTRYPOINT ["tunnel"]
CMD ["run", "--status", "127.0.0.1:9100", "/etc/tunnel"]
