"""The options every job command line shares: sites, job, environment, privacy, production.

Each job adds its own group (lora_job.py, one_shot_job.py, selective_job.py); recipe_args.py
turns these options into recipe arguments.
"""

from __future__ import annotations

import argparse

from flare_lora.components.flare.log_config import LOG_LEVELS
from flare_lora.components.flare.tracking import TRACKING
from flare_lora.components.training.config import DTYPES
from flare_lora.privacy.dp_config import add_dp_args


class JobParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not argparse's usage of every option before it."""
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def job_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    return JobParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(p: argparse.ArgumentParser, *, ranks: bool = True, rounds: bool = True) -> None:
    """``ranks=False``: the job sets the number of sites and their rank itself (selective);
    ``rounds=False``: a job of one round that ends by its own rule (one-shot)."""
    g = p.add_argument_group("sites")
    g.add_argument("--sites", default=None, metavar="NAMES",
                   help="the job's site names, comma-separated, as provisioned (e.g. hospital-a,hospital-b); "
                        "default site-1..N, N from the per-site list")
    if ranks:
        g.add_argument("--ranks", default=None,
                       help="LoRA rank per site, in --sites order (or one for all); without --sites the count sets "
                            "the number of sites (default 4,8,16, fedcdd 8,8,8; with --sites: 8)")
    g.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio * rank at every site")
    g.add_argument("--target-modules", default="q_proj,v_proj")
    g.add_argument("--steps", type=int, default=None, help="local optimizer steps per round")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per site (default: cores / sites here; exported and prod jobs: the site's "
                        "max_threads, else torch's default)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the base model's dtype at every site (default float32; LoRA factors stay float32)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more compute (not with DP-SGD)")
    g.add_argument("--eval", default=None, metavar="PATH",
                   help="multiple-choice questions every site scores the global model on each round, by log-likelihood "
                        "(an MMLU folder or a JSONL of {question, choices, answer}; a path at the sites)")
    g.add_argument("--eval-shots", type=int, default=None, metavar="K", help="--eval: solved examples per question (default 0)")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="--eval: first N questions per subject")
    g.add_argument("--eval-style", choices=["letter", "cloze"], default=None,
                   help="--eval: lettered choices scored by the letter (default) or each choice's text (cloze)")
    g.add_argument("--site-config", default=None,
                   help="JSON file {site: {key: value}} overriding the above per site (only the job's sites)")
    g = p.add_argument_group("job")
    if rounds:
        g.add_argument("--rounds", type=int, default=3)
        g.add_argument("--min-clients", type=int, default=None, help="fewest valid updates a round needs")
        g.add_argument("--clients-per-round", type=int, default=None, help="partial participation")
    g.add_argument("--model", default=None,
                   help="model dir (safetensors or GGUF), or a name each site maps in its local/flare_lora.json; "
                        "default: embedded SmolLM2")
    g.add_argument("--data", default=None,
                   help="dir with <site>.jsonl per site, or a name each site maps in its local/flare_lora.json; "
                        "default: embedded tasks. Paths are checked before a simulator or POC run, not at export")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--in-process", action="store_true", help="run site training inside the FLARE client process")
    g.add_argument("--max-trainer-restarts", type=int, default=None, metavar="N",
                   help="times per job a site starts a new training process after the last one died "
                        "(default 3; 0: never; not with --in-process)")
    g.add_argument("--site-script", action="append", default=[], metavar="SITE=PATH",
                   help="a site's own training script speaking the same protocol (repeatable)")
    g = p.add_argument_group("environment (--export / --export-dir: write the job folder for `nvflare job submit`)")
    g.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    g.add_argument("--log-level", choices=LOG_LEVELS, default="concise",
                   help="simulator console: concise (default: a line per site per round, warnings), FLARE's modes "
                        "(full, verbose, msg_only) or a level; FLARE's logs always go to the workspace's log files")
    g.add_argument("-v", dest="log_level", action="store_const", const="full", help="--log-level full")
    g.add_argument("--workspace", default=None, help="simulator / POC workspace (default: a new /tmp/flare_lora/<env>-XXXX per run)")
    g.add_argument("--startup-kit", default=None, help="admin startup kit (--env prod)")
    g.add_argument("--site-local", action="append", default=[], metavar="SITE=PATH",
                   help="POC: copy PATH into SITE's local/ folder, as its admin would (e.g. a privacy.json scope)")
    g.add_argument("--site-python", default=None, metavar="PYTHON",
                   help="the interpreter that sites start training with, in exported and --env prod jobs "
                        "(default python3; the simulator and POC use this one)")
    g.add_argument("--results", default=None,
                   help="where to copy results (default: ./results/<job name>); must be new or empty unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --results (only files flare-lora wrote there)")
    g.add_argument("--save-merged", action="store_true", help="also write the base with the trained weights as an HF model dir")
    g.add_argument("--tracking", choices=TRACKING, default="tensorboard",
                   help="live experiment tracking: sites stream their scalars to FLARE's receiver on the server "
                        "(default tensorboard; mlflow needs `pip install mlflow`)")
    add_dp_args(p)
    g = p.add_argument_group("homomorphic encryption (docs/he.md)")
    g.add_argument("--he", action="store_true",
                   help="aggregate CKKS ciphertexts: the server never sees an update or the global model "
                        "(keys: the startup kits' HEBuilder contexts; the simulator makes test-only ones)")
    add_production_args(p)


def add_production_args(p: argparse.ArgumentParser) -> None:
    """Deployment options (docs/production.md); the defaults change nothing."""
    g = p.add_argument_group("production (docs/production.md)")
    g.add_argument("--checkpoint-dir", default="",
                   help="server path (relative: under the server workspace) for a per-round checkpoint; "
                        "a job started on a checkpoint of the same job resumes after its last round")
    g.add_argument("--max-result-mb", type=float, default=0.0,
                   help="reject a site result larger than this many MB (0: no cap)")
    g.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="reject a site result that declares more examples, i.e. weight (default 1000000)")
    g.add_argument("--max-update-norm", type=float, default=None, metavar="X",
                   help="LoRA jobs: reject a site update with a module's ||s*B@A||_F above X or ||A||_F, ||s*B||_F above "
                        "sqrt(X), and the round's aggregate above X (default 100; 0: no bound)")
    g.add_argument("--model-config", default=None, metavar="PATH",
                   help="LoRA jobs: the base model (dir, .gguf or config.json) the server pins the sites' modules to, "
                        "when --model is a logical name or not on this machine")
    g.add_argument("--task-timeout", type=int, default=0,
                   help="seconds a round waits for a live site (0: until it answers or FLARE declares it dead)")
    g.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="N training processes per site (torch.distributed.run + DDP; one per GPU)")
    g.add_argument("--no-byoc", action="store_true",
                   help="job without code: sites run their pip-installed flare-lora and allow its classes")
