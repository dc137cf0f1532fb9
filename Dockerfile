# The dashboard on the shipped checkpoints (README, "Docker"):
#   docker build -t flowcore . && docker run -p 8501:8501 -v /path/to/data:/data flowcore
FROM python:3.11-slim
WORKDIR /opt/flowcore
# CPU build of torch first, so the project's plain `torch` requirement does not pull CUDA
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml setup.py README.md ./
COPY flowcore ./flowcore
COPY app ./app
COPY checkpoints ./checkpoints
RUN pip install --no-cache-dir -e ".[app,embeddings]" && useradd --create-home --uid 1000 flowcore
# the full data sets, if mounted (the gallery falls back to the examples bundled with flowcore)
ENV FLOWCORE_DATA_DIR=/data
USER flowcore
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"
# inside a container the app must listen on every interface to be reachable through -p
CMD ["flowcore", "app", "--port", "8501", "--host", "0.0.0.0"]
