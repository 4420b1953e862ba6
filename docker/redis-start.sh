#!/bin/sh
# The cluster profile's `redis` service (Celery broker): redis-server with the password from .env.
# The configuration goes in on stdin (`redis-server -`), so the password is not in the process's argv
# (`ps`, /proc/<pid>/cmdline). The image's entrypoint still drops root to the redis user.
set -eu
: "${REDIS_PASSWORD:?REDIS_PASSWORD is not set}"
# A broker holds only queued task messages: Airflow's scheduler re-queues what a restart loses, so no
# persistence to disk.
exec docker-entrypoint.sh redis-server - <<CONF
requirepass $REDIS_PASSWORD
save ""
appendonly no
CONF
