# The GPU environment for the record: CUDA 12.8, Python 3.12, PyTorch 2.13.0 (pinned: the one version the project
# tests; CI runs its CPU build; its CUDA build brings triton 3.7.1, which requirements.txt pins), then requirements.txt.
#   docker build -t speedrun .
#   docker run --gpus all --ipc=host -it -v "$(pwd)":/speedrun speedrun ./run.sh
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# run.sh and test.sh use this image's Python as it is: setup.sh installs nothing here
ENV SPEEDRUN_USE_SYSTEM_PYTHON=1

# torch first, from the CUDA 12.8 index, so that requirements.txt's torch>=2.13 finds it satisfied
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
WORKDIR /speedrun
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
CMD ["bash"]
