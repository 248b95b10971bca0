# The regcache proxy image: mitmproxy with regcache's addon, started by `regcache up`.
# The docker.io, ghcr.io and quay.io caches run as registry:2 services of docker-compose.yml;
# docker-registry (registry:2's program, as Debian ships it) is here so that `regcache up` can
# also run any extra cache whose URL in .env is loopback.
# /cache: where replicas mount the volume they share (deploy/compose/replicas.yml, deploy/kubernetes/).
# BASE: any image with Python 3.11+ and pip on Debian 12, as `python` and `pip`; the compose
# test builds on one made offline-capable from a debootstrap of bookworm.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends docker-registry \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home regcache \
 && mkdir /data /cache && chown regcache /data /cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY addons ./addons
# Editable, so that addons/regcache.py (which `regcache up` hands to mitmdump) stays beside
# the package, as in a checkout.
RUN pip install --no-cache-dir --disable-pip-version-check -e .

USER regcache
# Settings come from the environment (compose passes .env); the image holds no .env.
# PYTHONUNBUFFERED: stdout is no tty in a container, so Python would hold log lines back in
# its buffer and `docker logs` would show warnings late or never.
ENV REGCACHE_DATA_DIR=/data PYTHONUNBUFFERED=1
EXPOSE 5000 5050
CMD ["regcache", "up"]
