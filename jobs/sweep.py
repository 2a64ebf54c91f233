"""Sweep entry point for `ray job submit` (and for running by hand).

    ray job submit --address http://HEAD:8265 --runtime-env k8s/runtime_env.yaml -- \
        python jobs/sweep.py sweep=viewpoints_temperature experiment=avsa_yt360 storage=s3 \
        storage.path=s3://BUCKET/sweeps

Same arguments as `avsa sweep` (Hydra overrides). Under `ray job submit`, RAY_ADDRESS is set, so
the Tune driver joins that cluster; S3 and MLflow settings come from the environment.
Exit status: 0 with a best trial, 1 when every trial failed, 2 bad input.
"""

import logging
import sys
from pathlib import Path

# The uploaded working directory is the repository root (see jobs/pretrain.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avsa.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(["sweep", *sys.argv[1:]]))
