# GPU image: CUDA runtime base, non-root user, model mounted at /models, configuration by flags/env.
# Compose and Kubernetes files that run it: deploy/ (deploy/README.md).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# gcc, libc6-dev and python3-dev: Triton compiles its small C launcher the first time a kernel runs.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev make curl \
    && rm -rf /var/lib/apt/lists/*
# ubuntu:24.04 already has user `ubuntu` with UID/GID 1000; replace it so the IDs in deploy/ stay 1000.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --user-group hybridserve
WORKDIR /app
COPY --chown=1000:1000 . /app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# /app itself too: the editable install writes its egg-info there.
RUN python3 -m venv /opt/venv && chown -R 1000:1000 /opt/venv && chown 1000:1000 /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 1000:1000
# The README's install step, unchanged (`make serve` runs it first; PYTHON comes from the environment above).
RUN make install

ENV HYBRIDSERVE_MODEL=embedded HYBRIDSERVE_HOST=0.0.0.0 HYBRIDSERVE_PORT=8000 \
    HYBRIDSERVE_SHUTDOWN_TIMEOUT=30
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${HYBRIDSERVE_PORT}/health" || exit 1
# SIGTERM starts the drain: /health turns 503, admission stops, in-flight requests get up to
# HYBRIDSERVE_SHUTDOWN_TIMEOUT seconds. `docker stop` waits only 10 s unless told (-t, or compose's
# stop_grace_period). `exec` makes the server PID 1 so the signal reaches it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sh", "-c", "exec hybridserve serve --model \"$HYBRIDSERVE_MODEL\" --host \"$HYBRIDSERVE_HOST\" --port \"$HYBRIDSERVE_PORT\" --shutdown-timeout \"$HYBRIDSERVE_SHUTDOWN_TIMEOUT\" \"$@\"", "--"]
