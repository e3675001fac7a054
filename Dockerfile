# GPU image: CUDA runtime base, non-root user, model mounted at /models, configuration by flags/env.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv make curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 hybridserve
WORKDIR /app
COPY --chown=hybridserve:hybridserve . /app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python
RUN python3 -m venv /opt/venv && chown -R hybridserve /opt/venv
USER hybridserve
# the same install step as the README's `make serve`
RUN make install PYTHON=/opt/venv/bin/python

ENV HYBRIDSERVE_MODEL=embedded HYBRIDSERVE_HOST=0.0.0.0 HYBRIDSERVE_PORT=8000
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${HYBRIDSERVE_PORT}/health" || exit 1
ENTRYPOINT ["sh", "-c", "exec hybridserve serve --model \"$HYBRIDSERVE_MODEL\" --host \"$HYBRIDSERVE_HOST\" --port \"$HYBRIDSERVE_PORT\" \"$@\"", "--"]
