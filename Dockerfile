# vdiff for CPU nodes (deploy/kubernetes/overlays/cpu): torch's CPU build, and tritonserver 2.51.0
# with the Python backend from the nvidia-pytriton wheel, as `make setup` installs them. For GPU
# nodes use Dockerfile.triton (NVIDIA's Triton container). Neither image has been built on this
# project's machines, which have no container daemon.
#
#   docker build -t vdiff:cpu .
#   docker run --shm-size=1g -p 8000:8000 -v /models:/mnt/models:ro vdiff:cpu \
#       --model /mnt/models --trust-remote-code
FROM python:3.11-slim-bookworm

# the user the Kubernetes manifests run as (runAsUser 1000)
RUN useradd --uid 1000 --create-home --home-dir /home/vdiff vdiff
WORKDIR /opt/vdiff
COPY pyproject.toml README.md ./
COPY client ./client
COPY model_repository ./model_repository
COPY vdiff ./vdiff
# the CPU build first: a bare torch requirement resolves to the multi-gigabyte CUDA build
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir ./client ".[triton]" \
    && vdiff --help >/dev/null
USER 1000
ENV HOME=/home/vdiff

# The OpenAI API (vLLM's port); Triton listens on loopback 8100-8102 inside the container.
EXPOSE 8000
ENTRYPOINT ["vdiff", "--host", "0.0.0.0", "--port", "8000"]
CMD []
