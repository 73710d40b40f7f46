#!/usr/bin/env bash
# Launch configs/dataflow_gpu.yaml on Dataflow, one NVIDIA T4 per worker.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=gs://my-bucket \
#   IMAGE=us-central1-docker.pkg.dev/my-project/layerbeam/worker:0.1.0 \
#   scripts/run_dataflow.sh [--set key=value ...] [more Beam flags, e.g. --max_num_workers=50]
#
# IMAGE is the container built from ./Dockerfile (TensorFlow with CUDA + Beam's boot of the
# pinned Beam version). This package's own code is staged as an sdist (--setup_file), built
# the way Beam's stager builds it: python -m build --sdist --no-isolation.
# Add --dry_run=True to build the job graph and stage nothing, submit nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PROJECT:?set PROJECT to your GCP project id}"
: "${REGION:?set REGION to a region with T4s, e.g. us-central1}"
: "${BUCKET:?set BUCKET to gs://your-bucket (temp and staging files go under it)}"
: "${IMAGE:?set IMAGE to the worker image built from ./Dockerfile}"
ACCELERATOR="${ACCELERATOR:-nvidia-tesla-t4}"
MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-8}"   # T4s attach to N1 machines only

exec "${PYTHON:-python3}" -m layerbeam.cli run configs/dataflow_gpu.yaml --runner=DataflowRunner --project="$PROJECT" --region="$REGION" --temp_location="$BUCKET/tmp" --staging_location="$BUCKET/staging" --setup_file=./pyproject.toml --sdk_container_image="$IMAGE" --sdk_location=container --dataflow_service_options="worker_accelerator=type:$ACCELERATOR;count:1;install-nvidia-driver" --machine_type="$MACHINE_TYPE" --experiments=no_use_multiple_sdk_containers --disk_size_gb=50 "$@"
