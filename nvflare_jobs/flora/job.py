"""Federated LoRA fine-tuning with FLoRA stacking (or --method fedit / zero_pad / fedcdd) in NVIDIA FLARE.

    python nvflare_jobs/flora/job.py                       # 3 sites, ranks 4/8/16, simulator
    python nvflare_jobs/flora/job.py --env poc             # same job in POC mode
    python nvflare_jobs/flora/job.py --export --export-dir /tmp/flora_job   # then: nvflare job submit -j /tmp/flora_job/flora

The same command as `flare-lora run flora` (options: --help).
"""

import sys

from flare_lora.components.cli.main import job_main

if __name__ == "__main__":
    sys.exit(job_main("flora"))
