#!/bin/sh
# Entrypoint of the MLflow image: the tracking server with the basic-auth app, configured only from the
# environment (docker-compose.yml passes .env values; nothing secret is baked into the image).
#
#   MLFLOW_BACKEND_STORE_URI      tracking + registry store (postgresql+psycopg2://... in the stack)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts go (s3://bucket with MLFLOW_S3_ENDPOINT_URL
#                                 and AWS_* credentials in the stack); clients use mlflow-artifacts:/
#   MLFLOW_AUTH_DATABASE_URI      users and permissions store
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   the admin, created on the first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the basic-auth app's CSRF tokens
#   MLFLOW_ALLOWED_HOSTS          Host headers answered (DNS-rebinding protection)
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2), MLFLOW_AUTH_DEFAULT_PERMISSION
#   (NO_PERMISSIONS), MLFLOW_AUTH_CONFIG_PATH (where the rendered basic_auth.ini goes)
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
: "${MLFLOW_BACKEND_STORE_URI:?MLFLOW_BACKEND_STORE_URI is not set}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?MLFLOW_ARTIFACTS_DESTINATION is not set}"
: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI is not set}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD is not set}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_FLASK_SERVER_SECRET_KEY is not set}"
: "${MLFLOW_ALLOWED_HOSTS:?MLFLOW_ALLOWED_HOSTS is not set}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
export MLFLOW_AUTH_DEFAULT_PERMISSION="${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/near2-mlflow/basic_auth.ini}"
# background jobs (GenAI evaluation) are not used by near2 and cost a worker process
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
"${PYTHON:-python}" - "$here/basic_auth.ini.template" "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import os, string, sys
template, target = sys.argv[1], sys.argv[2]
try:
    text = string.Template(open(template).read()).substitute(os.environ)
except KeyError as exc:
    sys.exit(f"start-server: {exc.args[0]} is not set (needed by {template})")
with open(target, "w") as out:
    out.write(text)
PY

exec "${MLFLOW:-mlflow}" server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
