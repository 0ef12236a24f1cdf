"""Selective-layer federated fine-tuning in NVIDIA FLARE: each site trains only some decoder layers.

    python nvflare_jobs/selective_layer/job.py                         # 3 sites, budgets 2/4/8, simulator
    python nvflare_jobs/selective_layer/job.py --selection top         # baseline at the same budgets
    python nvflare_jobs/selective_layer/job.py --export --export-dir /tmp/sel_job   # for `nvflare job submit`

The same command as `flare-lora run selective` (options: --help; docs/selective_layer.md).
"""

import sys

from flare_lora.components.cli.main import job_main

if __name__ == "__main__":
    sys.exit(job_main("selective"))
