# Grounded SAM ML backend for Label Studio.
#   docker compose build          (or: docker build -t grounded-sam-backend .)
# The model files are downloaded and verified (SHA-256) while the image is built; a running container needs no
# network. Build arguments:
#   WEIGHTS     manifest entries of weights.py baked into /models (`python weights.py --list` names them all;
#               empty: none)
#   BASE_IMAGE  the base image (default: the pinned official Python image below)
#   WITH_RAY    true: also install Ray, to run the image as a Ray head or worker (default false)
#   HF_ENDPOINT a Hugging Face hub mirror to fetch the hub's model files from (default https://huggingface.co)
# SAM 3's checkpoint (ENGINE=sam3, a gated download) is baked in by Dockerfile.sam3, on top of this image: it needs a
# build secret, which only BuildKit has, and this file builds with the classic builder too.
#
# Base: the official Python image, pinned by tag and by digest. PyTorch comes from PyPI as requirements.txt pins it
# (torch 2.14.1, a CUDA 13.0 build whose wheels carry the CUDA libraries): the host needs only an NVIDIA driver that
# supports CUDA 13.0 (>= 580) and the NVIDIA Container Toolkit; the same image runs on CPU. See README "Docker".
# BASE_IMAGE: another image with the same `python`/`pip` on PATH (the tests build a stand-in from Debian packages,
# tests/docker/base.Dockerfile, because their machines can't pull this one); leave it for real builds.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The project's pinned set, installed the way `make install` does (see README "Why rf-groundingdino").
COPY requirements.txt requirements-nodeps.txt constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt -r requirements.txt \
    && SAM2_BUILD_CUDA=0 pip install --no-cache-dir -c constraints.txt --no-deps --no-build-isolation \
       -r requirements-nodeps.txt

# WITH_RAY=true adds Ray (requirements-ray.txt), so the same image also serves as a Ray node for
# `cli.py annotate --ray` (README "Many GPUs"). A layer of its own: the one above stays cached either way.
ARG WITH_RAY=false
COPY requirements-ray.txt ./
RUN if [ "${WITH_RAY}" = "true" ]; then pip install --no-cache-dir -c constraints.txt -r requirements-ray.txt; fi

# Model files, fetched by the project's own download tool into /models (owned by root: read-only for the service).
# This layer depends only on weights.py, its manifest weights.json and WEIGHTS (split into names), so other code
# changes do not download them again.
ARG WEIGHTS="groundingdino_swint_ogc.pth mobile_sam.pt sam_vit_h_4b8939.pth bert-base-uncased"
# A Hugging Face hub mirror for the hub's files (read by huggingface_hub in this step only).
ARG HF_ENDPOINT=https://huggingface.co
COPY weights.py weights.json ./
# WEIGHTS="" bakes in no model file (mount your own: README "Where the weights come from"); weights.py without
# names would fetch what the settings need instead.
RUN if [ -n "${WEIGHTS}" ]; then python weights.py --dir /models ${WEIGHTS}; fi

COPY *.py ./
# The service's page (GET / in a browser): its HTML, CSS and JavaScript.
COPY ui ./ui
# The service runs as an unprivileged user (uid/gid 1000) that can write only /data and /models/local (where
# docker-compose.yml mounts a volume for checkpoints of your own).
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home app \
    && mkdir -p /data /models/local \
    && chown 1000:1000 /data /models/local
USER 1000:1000

# Container defaults. MODEL_DIR, DATA_DIR and GROUNDINGDINO_TEXT_ENCODER point into the image; the others are the
# service's own defaults (README "Environment variables"), written here so `docker inspect` shows them.
# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: never reach the model hub at run time.
ENV MODEL_DIR=/models \
    DATA_DIR=/data \
    GROUNDINGDINO_TEXT_ENCODER=/models/bert-base-uncased \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=32 \
    TIMEOUT=300

VOLUME ["/data"]
EXPOSE 9090

# /health answers at once, also while the models load; the check fails when it does not answer or when model
# loading failed (then /predict can only answer 503).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request as u; r = u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4); sys.exit(json.load(r).get('models') == 'failed')"]

# gunicorn.conf.py (in /app) reads HOST, PORT, WORKERS, THREADS, TIMEOUT and LOG_LEVEL from the environment and
# starts each worker's model loading after the fork. Never add --preload: CUDA breaks in forked workers.
CMD ["gunicorn", "_wsgi:app"]
