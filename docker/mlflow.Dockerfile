# syntax=docker/dockerfile:1
# The MLflow tracking server of the stack: mlflow 3.17.2 with the basic-auth app, psycopg2 (Postgres
# stores) and boto3 (S3 / MinIO artifacts), from a pinned lock. Configuration comes only from the
# environment at run time (mlflow/start-server.sh); the image holds no secret.
#   docker compose build mlflow
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/mlflow-requirements.lock /opt/mlflow/requirements.lock
RUN pip install --no-cache-dir -r /opt/mlflow/requirements.lock \
 && useradd --system --uid 10001 --gid 0 --home-dir /opt/mlflow --shell /usr/sbin/nologin mlflow

COPY --chmod=0755 mlflow/start-server.sh mlflow/setup_users.py /opt/mlflow/
COPY --chmod=0644 mlflow/basic_auth.ini.template /opt/mlflow/

USER mlflow
WORKDIR /opt/mlflow
EXPOSE 5000
ENTRYPOINT ["/opt/mlflow/start-server.sh"]
