# One image for the three services and the provisioning job.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY devstack ./devstack
COPY segmentctl ./segmentctl
COPY migrations ./migrations
RUN pip install . && useradd --system --uid 10001 segmentation
USER segmentation

# docker-compose.yml chooses the service: python -m services.<name>
CMD ["python", "-m", "services.query_api"]
