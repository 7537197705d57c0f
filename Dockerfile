# leasehold: Celery workers, beat, Flower and the `leasehold` console script, for MySQL + Redis.
# Built by docker-compose.yml; by hand: docker build -t leasehold .
# No secrets here: every setting, passwords and tokens included, comes from LEASEHOLD_* at run time.

# --- build: compile mysqlclient (against Debian's libmariadb) and install leasehold in a venv ---
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        default-libmysqlclient-dev pkg-config build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/leasehold
ENV PATH=/opt/leasehold/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is made of (pyproject: py-modules celeryconfig, packages storage/leases/tasks).
COPY pyproject.toml README.md celeryconfig.py ./
COPY storage ./storage
COPY leases ./leases
COPY tasks ./tasks
RUN pip install ".[mysql,flower]"

# --- runtime: the venv, the client library, no compiler, a non-root user ---
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmariadb3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 leasehold \
    && useradd --system --uid 10001 --gid leasehold --home-dir /app --no-create-home leasehold
COPY --from=build /opt/leasehold /opt/leasehold
WORKDIR /app
COPY examples ./examples
# Beat keeps its schedule file under LEASEHOLD_VAR_DIR: the one folder the user may write.
RUN mkdir var && chown leasehold:leasehold var
ENV PATH=/opt/leasehold/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LEASEHOLD_VAR_DIR=/app/var
USER 10001:10001
CMD ["leasehold", "--help"]
