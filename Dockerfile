# The dashboard on the shipped checkpoints: docker build -t flowcore . && docker run -p 8501:8501 flowcore
FROM python:3.11-slim
WORKDIR /opt/flowcore
# CPU build of torch first, so the project's plain `torch` requirement does not pull CUDA
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY flowcore ./flowcore
COPY app ./app
COPY checkpoints ./checkpoints
RUN pip install --no-cache-dir -e ".[app]"
EXPOSE 8501
# inside a container the app must listen on every interface to be reachable through -p
CMD ["flowcore", "app", "--port", "8501", "--host", "0.0.0.0"]
