"""Pretraining entry point for `ray job submit` (and for running by hand).

    ray job submit --address http://HEAD:8265 --runtime-env k8s/runtime_env.yaml -- \
        python jobs/pretrain.py experiment=avsa_yt360 storage=s3 storage.path=s3://BUCKET/runs

Same arguments as `avsa pretrain` (Hydra overrides). Under `ray job submit`, RAY_ADDRESS is set,
so the driver joins that cluster; S3 and MLflow settings come from the environment (AWS_*,
AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI). Exit status: 0 done, 2 bad input (one-line error).
"""

import logging
import sys
from pathlib import Path

# The uploaded working directory is the repository root: make `avsa` importable from it even
# where the image has only avsa's dependencies installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avsa.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(["pretrain", *sys.argv[1:]]))
