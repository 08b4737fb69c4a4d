# backhauld for the docker-compose demo (docker-compose.yml, docs/DEMO.md).
# Build from the repository root:
#
#   build: { context: ., dockerfile: docker/server.Dockerfile }
#
# The container runs backhauld as the unprivileged user "backhaul" with its
# data dir on the /data volume, and publishes the server's SSH public key on
# the /keys volume for the demo nodes (docker/server-entrypoint.sh).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The install needs only the packaging metadata and the three packages; the
# tests, docs and fixtures stay out of the image.
WORKDIR /usr/src/backhaul
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY storage ./storage
COPY cli ./cli
# EXTRAS=scale (the compose file's scale-out profile) adds psycopg and procrastinate.
ARG EXTRAS=server
RUN pip install ".[server]" && if [ "$EXTRAS" != server ]; then pip install ".[$EXTRAS]"; fi

# /data and /keys are created here, owned by the service user, so that the
# named volumes mounted on them start out with that owner.
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin backhaul \
    && install -d -m 0700 -o backhaul -g backhaul /data \
    && install -d -m 0755 -o backhaul -g backhaul /keys

COPY docker/server-entrypoint.sh /usr/local/bin/server-entrypoint
# Explicit: a checkout may have lost the script's executable bit.
RUN chmod 0755 /usr/local/bin/server-entrypoint

# The server reads BACKHAUL_DATA_DIR and BACKHAUL_LISTEN; the client
# (`docker compose exec server backhaul ...`) reads its token from
# $BACKHAUL_DATA_DIR/api-token and talks to http://127.0.0.1:7710.
ENV BACKHAUL_DATA_DIR=/data \
    BACKHAUL_LISTEN=0.0.0.0:7710

USER backhaul
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7710
HEALTHCHECK --interval=3s --timeout=3s --start-period=30s --retries=3 \
    CMD test -s /keys/backhaul.pub && python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7710/health', timeout=2)" || exit 1
ENTRYPOINT ["/usr/local/bin/server-entrypoint"]
CMD ["--data-dir", "/data", "--listen", "0.0.0.0:7710"]
