# One image for the API and the worker of the SSQL training service.
# The torch wheel from PyPI bundles the CUDA runtime; the GPU reaches the worker container through
# the NVIDIA container toolkit (see the worker's device reservation in docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SSQL_HOME=/data/ssql

# the API's image needs no CUDA: build it with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=""

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY ssql_core ssql_core
COPY persistence persistence
COPY migrations migrations
COPY api api
COPY worker worker
COPY ssql_cli ssql_cli
COPY ssql_client ssql_client
COPY storage storage
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch torchvision --index-url "$TORCH_INDEX_URL"; fi \
 && pip install . \
 && useradd --create-home --uid 1000 ssql \
 && mkdir -p /data/ssql /data/datasets \
 && chown -R ssql /data

USER ssql
EXPOSE 8000
CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
