#!/bin/sh
# One-shot `minio-setup` service (runs in the MinIO image, which ships `mc`). Idempotent.
# Creates MLflow's artifact bucket and a MinIO user that may touch that bucket only, so the MLflow
# server never holds the MinIO root credentials.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_S3_ACCESS_KEY_ID:?}" \
  "${MLFLOW_S3_SECRET_ACCESS_KEY:?}" "${MLFLOW_ARTIFACTS_BUCKET:?}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
policy=near2-mlflow-artifacts
policy_file="$(mktemp)"
trap 'rm -f "$policy_file"' EXIT

mc alias set near2 "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "near2/$MLFLOW_ARTIFACTS_BUCKET"

cat > "$policy_file" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$MLFLOW_ARTIFACTS_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::$MLFLOW_ARTIFACTS_BUCKET/*"]}
  ]
}
JSON
mc admin policy create near2 "$policy" "$policy_file"
# `user add` on an existing user sets its secret: re-running after a change in .env rotates it
mc admin user add near2 "$MLFLOW_S3_ACCESS_KEY_ID" "$MLFLOW_S3_SECRET_ACCESS_KEY"
mc admin policy attach near2 "$policy" --user "$MLFLOW_S3_ACCESS_KEY_ID" 2>/dev/null \
  || mc admin user info near2 "$MLFLOW_S3_ACCESS_KEY_ID" | grep -q "$policy"
echo "minio-setup: bucket $MLFLOW_ARTIFACTS_BUCKET and user $MLFLOW_S3_ACCESS_KEY_ID (policy $policy) ready"
