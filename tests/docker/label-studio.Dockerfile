# TESTS ONLY: a stand-in for heartexlabs/label-studio:1.23.2 (docker-compose.yml's with-label-studio profile),
# which the test machines can't pull. tests/test_docker.py builds it from PyPI's label-studio on the stand-in base
# (base.Dockerfile), pinned by tests/label-studio-constraints.txt like the other end-to-end tests' Label Studio, and
# tags it with the compose file's image name. Like the official image: uid 1001, data in /label-studio/data (the
# compose volume), `label-studio start` on 0.0.0.0:8080.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG LS_VERSION
COPY label-studio-constraints.txt /tmp/
RUN pip install --no-cache-dir -c /tmp/label-studio-constraints.txt "label-studio==${LS_VERSION}" \
    && rm /tmp/label-studio-constraints.txt
RUN groupadd --gid 1001 labelstudio \
    && useradd --uid 1001 --gid 1001 --home-dir /label-studio --create-home labelstudio \
    && mkdir -p /label-studio/data \
    && chown -R 1001:1001 /label-studio
ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data
USER 1001:1001
WORKDIR /label-studio
VOLUME ["/label-studio/data"]
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "-p", "8080"]
