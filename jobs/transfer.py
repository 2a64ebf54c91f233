"""Downstream transfer entry point for `ray job submit` (and for running by hand).

    ray job submit --address http://HEAD:8265 --runtime-env k8s/runtime_env.yaml -- \
        python jobs/transfer.py TASK pretrain=RUN_ID [overrides]

Same arguments as `avsa transfer`: TASK (avc_bin, avsa_bin, action, segmentation), then Hydra
overrides; `pretrain=` takes an MLflow run id, a checkpoint URI or `scratch`. MLflow and S3
settings come from the environment. Exit status: 0 done, 2 bad input (one-line error).
"""

import logging
import sys
from pathlib import Path

# The uploaded working directory is the repository root (see jobs/pretrain.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avsa.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(["transfer", *sys.argv[1:]]))
