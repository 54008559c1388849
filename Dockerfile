# cn4 service image: the REST API, workers and migrations share it.
# torch is installed first from the CPU wheel index, pinned, because a looser requirement makes
# pip resolve a multi-GB CUDA build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CN4_HOME=/data/cache

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY search ./search
COPY latency_models ./latency_models
COPY service ./service
COPY migrations ./migrations
RUN pip install -e .

RUN useradd --create-home --uid 1000 cn4 && mkdir -p /data && chown cn4:cn4 /data
USER cn4
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"

CMD ["cn4", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
