# One image for every process of the relay:
#   relay serve     (default)   a replica: the OpenAI API and the publisher channels
#   relay worker                housekeeping (arq cron) against the shared Redis
#   relay publish -c FILE       a publisher agent next to a model server
# Dependencies come from pyproject.toml alone; nothing is installed in the
# final stage but the virtualenv built here. Pin the base by digest too
# (python:3.11.13-slim-bookworm@sha256:...) where your registry policy asks
# for it; the tag is pinned to a patch release.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/relay
# The metadata first: a code change alone reuses the dependency layer.
COPY pyproject.toml README.md ./
RUN mkdir relay worker \
    && touch relay/__init__.py worker/__init__.py \
    && /opt/relay/bin/pip install --no-cache-dir . \
    && /opt/relay/bin/pip uninstall --yes llm-relay
COPY relay ./relay
COPY worker ./worker
RUN /opt/relay/bin/pip install --no-cache-dir --no-deps . \
    && /opt/relay/bin/python -m compileall -q /opt/relay/lib

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="llm-relay" \
      org.opencontainers.image.description="Publish self-hosted LLMs behind NAT; reach them by name through one OpenAI-compatible endpoint." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay
COPY --from=build /opt/relay /opt/relay
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8080
USER 10001:10001
EXPOSE 8080
# exec form: relay is PID 1 and gets SIGTERM itself, which starts the drain.
ENTRYPOINT ["relay"]
CMD ["serve"]
