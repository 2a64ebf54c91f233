# The avsa image: the Ray image of the version the project pins, with avsa and its dependencies.
# Two tags from this one file (docs/cluster.md, step 2):
#   docker build -t REGISTRY/avsa:0.1.0 .        CPU torch: head and decode (cpu) workers
#   docker build --build-arg RAY_FLAVOR=-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#     -t REGISTRY/avsa:0.1.0-gpu .               CUDA torch on Ray's CUDA image: gpu workers
# Jobs still upload their working directory (`ray job submit --working-dir .`); jobs/*.py put it
# first on sys.path, so the image only has to change when the dependencies do.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_FLAVOR=""
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_FLAVOR}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The Ray images run as `ray` (uid 1000, gid 100), as the chart's securityContext expects.
USER 1000:100
WORKDIR /home/ray/avsa
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first, in its own layer: it is most of the image and changes least.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Editable install: `configs/` stays beside the package, where avsa looks for it.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 avsa ./avsa
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 k8s ./k8s
RUN pip install --no-cache-dir -e . \
    && python -c "import avsa.cli, av, mlflow, hydra, torch, ray; print('avsa image ok', ray.__version__, torch.__version__)"

ENV PYTHONUNBUFFERED=1
