# One image for every idsync process; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid/gid so volume ownership stays the same across rebuilds.
RUN groupadd --system --gid 10001 idsync \
    && useradd --system --uid 10001 --gid idsync --create-home --home-dir /home/idsync \
        --shell /usr/sbin/nologin idsync

# alembic.ini and migrations/ are read from here (`alembic upgrade head`).
WORKDIR /app

# The whole source goes in before pip runs: installing before the packages'
# __init__.py files exist makes them namespace packages, and `celery -A workers`
# then fails outside the source tree (DESIGN: pitfalls). .dockerignore keeps
# .env, .venv, .git, tests and local databases out.
COPY . .
RUN pip install . \
    && cd / && python -c "import idsync, ingest, migrations, models, workers" \
    && mkdir -p /var/lib/idsync /var/lib/flower \
    && chown idsync:idsync /var/lib/idsync /var/lib/flower

USER idsync:idsync
ENV HOME=/home/idsync

EXPOSE 8000
CMD ["gunicorn", "ingest:create_app()", "--bind", "0.0.0.0:8000", "--workers", "2", \
     "--no-control-socket", "--worker-tmp-dir", "/dev/shm", "--access-logfile", "-"]
