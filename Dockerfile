# Grounded SAM ML backend for Label Studio.
# Build: docker compose build   (weights are fetched at build time; the running container needs no network)
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl: HEALTHCHECK. PyPI's torch wheels carry their CUDA libraries: the host needs only the NVIDIA driver
# and the NVIDIA container toolkit.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl=7.88.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt \
    && pip install --no-deps -r requirements-nodeps.txt

# Which weights go into the image (names from weights.py's MANIFEST; bert-base-uncased is the text encoder).
ARG WEIGHTS="groundingdino_swint_ogc.pth mobile_sam.pt sam_vit_h_4b8939.pth bert-base-uncased"
COPY config.py weights.py ./
RUN python weights.py --dir /models ${WEIGHTS}

COPY *.py ./
RUN useradd --create-home --uid 1000 app && mkdir -p /data && chown app /data
USER app

ENV MODEL_DIR=/models \
    DATA_DIR=/data \
    GROUNDINGDINO_TEXT_ENCODER=/models/bert-base-uncased \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=4 \
    TIMEOUT=300

EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1

# gunicorn.conf.py reads PORT, WORKERS, THREADS, TIMEOUT; never --preload (CUDA in forked workers).
CMD ["gunicorn", "_wsgi:app"]
