"""One-shot federated fine-tuning in NVIDIA FLARE: every site trains once, the server folds results in as they arrive.

    python nvflare_jobs/one_shot/job.py                                # 3 sites, ranks 4/8/16, stacking
    python nvflare_jobs/one_shot/job.py --method full                  # full-parameter fine-tuning
    python nvflare_jobs/one_shot/job.py --export --export-dir /tmp/one_shot_job   # for `nvflare job submit`

The same command as `flare-lora run one-shot` (options: --help; docs/one_shot.md).
"""

import sys

from flare_lora.components.cli.main import job_main

if __name__ == "__main__":
    sys.exit(job_main("one-shot"))
