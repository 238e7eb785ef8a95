# TESTS ONLY: a stand-in for the Dockerfile's base image (python:3.11.14-slim-bookworm), which the test machines
# can't pull (no Docker Hub). tests/test_docker.py builds it from Debian's own packages and passes it to the real
# Dockerfile as BASE_IMAGE; never use it for a real image.
#   rootfs.tar   `debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm` (Debian's
#                Python 3.11 and pip), without apt's caches, as the official slim image is
#   pip.conf, ca-certificates.crt   THIS MACHINE's package index settings and CA bundle (its PyPI access may go
#                through a local mirror and an interception CA), written by the test from `pip config list`; they
#                belong here, never in the Dockerfile.
FROM scratch
ADD rootfs.tar /
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
# Behave like the official image: `python` and `pip` on PATH, and pip installs into the system as root (Debian
# marks its Python externally managed; the official image's is its own build under /usr/local).
RUN rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip \
    && python --version && pip --version
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
