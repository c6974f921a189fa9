# The batcher worker image: one shard per container (see deploy/README.md).
#   docker build -t batcher:0.1.0 .
#   docker run --rm -e BATCHER_API_KEY batcher:0.1.0 run /job/job.yaml --out s3://BUCKET/PREFIX
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# only what the package build needs: pyproject.toml, the README it names, and the package
COPY pyproject.toml README.md ./
COPY batcher ./batcher
RUN pip install ".[redis,s3]" && rm -rf /src

# a fixed non-root user, matching runAsUser in deploy/kubernetes/job.yaml
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin batcher
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["batcher"]
CMD ["--help"]
