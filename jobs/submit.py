"""Print a KubeRay RayJob (k8s/'s, sized by flags) that runs one of the jobs/ entry points.

    python jobs/submit.py avsa-pretrain -n avsa --gpu-workers 4 --s3-secret avsa-s3 \
        --working-dir s3://BUCKET/code/avsa.zip --dry-run -- \
        python jobs/pretrain.py experiment=avsa_yt360 storage=s3 storage.path=s3://BUCKET/runs

Same arguments as `avsa submit` (`avsa.cluster.main`); pipe the manifest to
`kubectl create -f -`. Exit status: 0 printed, 2 bad input.
"""

import logging
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avsa.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(["submit", *sys.argv[1:]]))
