# syntax=docker/dockerfile:1
# zipvl-ray on Ray 2.60, CPU image: the base of k8s/rayservice-cpu.yaml (kind / minikube, built-in models).
#
#   docker build -t zipvl-ray:0.1.0 .                # from the repository root
#   kind load docker-image zipvl-ray:0.1.0           # or: minikube image load zipvl-ray:0.1.0
#
# The package is installed into the base image's own Python (the one `ray start` runs), not only
# shipped in a runtime_env: when KubeRay submits serveConfigV2, the head's dashboard imports
# deployments.app, the request router and the autoscaling policy to validate the config.
# Nothing is downloaded from a model hub at build time (HF_HUB_OFFLINE=1; the built-in models are
# built offline, real checkpoints come from a volume at run time: see docs/kubernetes.md).
FROM rayproject/ray:2.60.0-py311

ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=zipvl_ray.api.middleware:proxy_middlewares \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, pinned: the CPU wheel, so that no CUDA libraries land in a CPU image.
RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# 2. The package (zipvl_ray and deployments), not editable, with torch and ray held where they are.
WORKDIR /tmp/zipvl-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users zipvl_ray ./zipvl_ray
COPY --chown=ray:users deployments ./deployments
RUN printf 'torch==%s\nray==%s\n' "${TORCH_VERSION}" "${RAY_VERSION}" > /tmp/constraints.txt \
    && python -m pip install --constraint /tmp/constraints.txt ".[otlp]" \
    && python -c "import torch, ray; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
    && rm -rf /tmp/zipvl-ray /tmp/constraints.txt

# 3. The Serve configs (for `serve run` in the image), and a build-time proof that every import path
#    they name (app builder, router, autoscaling policy) resolves in this image.
WORKDIR /home/ray
COPY --chown=ray:users configs ./zipvl-ray/configs
RUN python -m zipvl_ray.k8s imports zipvl-ray/configs/*.yaml
