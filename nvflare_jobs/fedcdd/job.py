"""FedCDD (consensus-divergence decoupled aggregation) with optional site-side noise masking, in NVIDIA FLARE.

    python nvflare_jobs/fedcdd/job.py                                    # 3 sites, rank 8, simulator
    python nvflare_jobs/fedcdd/job.py --mask-rho 0.5 --mask-sigma 0.001   # + Gaussian-noise mask (not DP)
    python nvflare_jobs/fedcdd/job.py --fedcdd-variant consensus          # ablation: consensus step only

The same command as `flare-lora run fedcdd`: the flora job with --method fedcdd --ranks 8,8,8
(options: --help; docs/fedcdd.md).
"""

import sys

from flare_lora.components.cli.main import job_main

if __name__ == "__main__":
    sys.exit(job_main("fedcdd"))
