# Worker image for Dataflow (and any portable runner with DOCKER environments): TensorFlow
# with CUDA from pip wheels, every dependency at the version constraints.txt pins, and
# Beam's worker boot entrypoint copied from the Beam SDK image of exactly the pinned Beam
# version (tests/test_runners.py checks that BEAM_VERSION and TF_VERSION equal the pins).
#
#   docker build -t $IMAGE . && docker push $IMAGE      # then scripts/run_dataflow.sh
#   (or a Flex Template on this image: README, "Scheduled builds")
#
# Python's minor version must equal the launcher's (3.11): Beam pickles across them.
ARG BEAM_VERSION=2.77.0
ARG PY_VERSION=3.11
# Dataflow's Flex Template launcher for the same Python (pin a dated tag for reproducible builds)
ARG FLEX_LAUNCHER_IMAGE=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest
FROM apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk
FROM ${FLEX_LAUNCHER_IMAGE} AS flex_launcher

FROM python:${PY_VERSION}-slim
ARG TF_VERSION=2.21.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    # Dataflow's install-nvidia-driver mounts the host driver here
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib
WORKDIR /opt/layerbeam
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY transforms ./transforms
# Dependencies are baked in; the launcher still stages this package as an sdist
# (--setup_file), so workers always run the launcher's code.
RUN pip install -c constraints.txt "tensorflow[and-cuda]==${TF_VERSION}" ".[gcp]" \
 && cd / && python -c "import apache_beam, tensorflow, layerbeam.run, layerbeam.transforms.beam"
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
# The same image launches a Dataflow Flex Template (scripts/launch/metadata.json): the
# launcher binary runs FLEX_TEMPLATE_PYTHON_PY_FILE with the template's parameters as
# flags; workers still start through Beam's boot, the entrypoint.
COPY configs ./configs
COPY scripts/launch/flex_template_main.py ./scripts/launch/
COPY --from=flex_launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/layerbeam/scripts/launch/flex_template_main.py
ENTRYPOINT ["/opt/apache/beam/boot"]
