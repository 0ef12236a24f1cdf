"""FedCDD (consensus-divergence decoupled aggregation) with optional site-side noise masking, in FLARE.

    python nvflare_jobs/fedcdd/job.py                                    # 3 sites, rank 8, simulator
    python nvflare_jobs/fedcdd/job.py --mask-rho 0.5 --mask-sigma 0.001   # + Gaussian-noise mask (not DP)
    python nvflare_jobs/fedcdd/job.py --fedcdd-variant consensus          # ablation: consensus step only
    python nvflare_jobs/fedcdd/job.py --method fedit --mask-rho 0.5       # ablation: FedIT + mask
    python nvflare_jobs/fedcdd/job.py --fedcdd-target delta --ranks 4,8,16  # heterogeneous ranks

Same options as nvflare_jobs/flora/job.py plus the fedcdd/mask groups; see docs/fedcdd.md.
"""

import sys

from flare_lora.components.flare.job_cli import lora_job_main

if __name__ == "__main__":
    sys.exit(lora_job_main(__doc__, method="fedcdd", ranks="8,8,8"))
