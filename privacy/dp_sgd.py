"""Sample-level DP-SGD for the one local loop (``train_lora(..., dp=DPSGD(...))``), with Opacus.

Only the trainable parameters (the LoRA factors, or a selective job's layers) get per-record
gradients; the frozen base needs none. Each step draws records by Poisson sampling (Opacus'
``UniformWithReplacementSampler``, rate q = batch_size * grad_accum / N), clips every record's
gradient to ``dp_max_grad_norm`` C and adds N(0, σ²C²) to the sum (Opacus' ``DPOptimizer``), which
the optimizer then divides by the expected batch qN. Micro-batches of at most batch_size records
accumulate clipped sums; the noise is added once per step.

Accounting: steps are charged to the site's :class:`~flare_lora.privacy.ledger.PrivacyLedger` before
their noise is drawn, in blocks of 1, 1, 2, 4, ... steps (σ, q, block), so a round that stops
early is charged for at most twice the steps it ran, never fewer; ε is Opacus' RDP or PRV accountant over the whole ledger, so it
accumulates across rounds, jobs and restarts. σ comes from ``dp_noise_multiplier`` or from the
target ``dp_epsilon`` over ``dp_planned_steps`` (Opacus' ``get_noise_multiplier``). A round whose
steps would take the ledger past a budget is refused before it trains (and a step, should another job
have spent meanwhile): the job's ``dp_epsilon_max`` (at the
job's δ and accountant) and the site admin's ``dp_epsilon_max`` in ``local/flare_lora.json``
(components/site_local.py), charged at the site's own ``dp_delta`` / ``dp_accountant``; where the site
sets none, at δ = min(the job's, 1e-5) with RDP (the larger ε of the two accountants), never at a
looser δ or accountant a job picks.

Noise and sampling draw from fresh OS entropy unless ``noise_seed`` is given (tests and
benchmarks): noise seeded from the job's public seed could be subtracted by anyone who reads it.

Opacus modes (``dp_clipping``): "hooks" (per-record gradients from layer hooks; the default),
"functorch" (every layer through torch.func), "ghost" (ghost clipping: per-record norms without
materialising per-record gradients, a second backward pass) and "fast" (fast gradient clipping:
per-record gradients for the norms, then the same second pass). docs/dp.md compares their speed.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import torch

from flare_lora.components.site_local import SiteLocal
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.ledger import PrivacyLedger, epsilon, site_ledger
from flare_lora.components.optional import optional

# flare-lora[dp]: imported on first use, so that a site without DP-SGD needs no Opacus
accountant_utils, grad_sample, optimizers = optional("opacus.accountants.utils"), optional("opacus.grad_sample"), \
    optional("opacus.optimizers")
clipping_utils, samplers = optional("opacus.utils.fast_gradient_clipping_utils"), optional("opacus.utils.uniform_sampler")

DEFAULT_DELTA = 1e-5
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_ACCOUNTANT = "rdp"
DEFAULT_CLIPPING = "hooks"
LEDGER_NAME = "dp_sgd.jsonl"


SITE_DELTA = 1e-5  # the δ a site budget is charged at when the site admin names none

class PrivacyBudgetExceeded(RuntimeError):
    """A round would spend more than the site's ε budget; nothing was trained."""


class DPUnsupported(RuntimeError):
    """Opacus cannot make this model's trainable layers private; nothing was trained."""


@dataclass(frozen=True)
class Budget:
    """An ε limit, measured at its own δ and accountant; ``source`` names the setting."""

    limit: float
    delta: float
    accountant: str
    source: str


class DPSGD:
    """DP-SGD settings of one site, its ledger and budget; ``session`` makes one round private."""

    def __init__(self, cfg: SiteConfig, num_records: int, *, site: str = "", ledger: PrivacyLedger | None = None,
                 local: SiteLocal | None = None, noise_seed: int | None = None):
        if not cfg.dp:
            raise ConfigError(f"site {site!r}: key 'dp_epsilon': DPSGD needs dp_epsilon or dp_noise_multiplier")
        if num_records < 1:
            raise ValueError(f"site {site!r}: DP-SGD needs training records, got {num_records}")
        self.site = site
        self.num_records = num_records
        self.delta = cfg.dp_delta if cfg.dp_delta is not None else DEFAULT_DELTA
        if self.delta >= 1 / num_records:
            raise ConfigError(f"site {site!r}: key 'dp_delta': expected < 1 / training records "
                              f"(N={num_records}: < {1 / num_records:.3g}), got {self.delta!r}")
        self.max_grad_norm = cfg.dp_max_grad_norm or DEFAULT_MAX_GRAD_NORM
        self.accountant = cfg.dp_accountant or DEFAULT_ACCOUNTANT
        self.clipping = cfg.dp_clipping or DEFAULT_CLIPPING
        self.batch_size = cfg.batch_size
        self.sample_rate = min(1.0, cfg.batch_size * cfg.grad_accum / num_records)
        if cfg.dp_noise_multiplier is not None:
            self.noise_multiplier = float(cfg.dp_noise_multiplier)
        else:
            if cfg.dp_planned_steps is None:
                raise ConfigError(f"site {site!r}: key 'dp_planned_steps': expected the total local steps the "
                                  "target dp_epsilon covers (the job recipes set rounds x local_steps), got None")
            self.noise_multiplier = accountant_utils.get_noise_multiplier(
                target_epsilon=cfg.dp_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=cfg.dp_planned_steps, accountant=self.accountant,
            )
        self.budgets = [Budget(cfg.dp_epsilon_max, self.delta, self.accountant, "the job's dp_epsilon_max")] \
            if cfg.dp_epsilon_max is not None else []
        if local is not None and local.dp_epsilon_max is not None:  # the site admin's, charged the site's way
            self.budgets.append(Budget(local.dp_epsilon_max, local.dp_delta or min(self.delta, SITE_DELTA),
                                       local.dp_accountant or "rdp", f"dp_epsilon_max of {local.path}"))
        self.epsilon_max = min((b.limit for b in self.budgets), default=None)
        self.ledger = ledger or PrivacyLedger()
        self.noise_seed = noise_seed
        for budget in self.budgets:
            spent = self.ledger.epsilon(budget.delta, budget.accountant)
            if spent >= budget.limit:
                raise ConfigError(
                    f"site {site!r}: key 'dp_epsilon_max': budget {budget.limit:g} ({budget.source}) already spent "
                    f"(ε={spent:.3f} at δ={budget.delta:g} over {self.ledger.steps} DP steps, ledger "
                    f"{self.ledger.path or 'in memory'}); refusing to train"
                )

    @classmethod
    def for_site(cls, cfg: SiteConfig, site: str, num_records: int, local: SiteLocal) -> DPSGD | None:
        """What a FLARE site trains with: None without DP; the ledger in the site's workspace
        (``local.root``); budgets of the job and the site admin."""
        if not cfg.dp:
            return None
        return cls(cfg, num_records, site=site, ledger=site_ledger(local.root, LEDGER_NAME), local=local)

    @property
    def spent(self) -> float:
        """ε spent at δ by every DP step in the ledger."""
        return self.ledger.epsilon(self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        return self.ledger.epsilon(self.delta, self.accountant, (self.noise_multiplier, self.sample_rate, steps))

    def report(self) -> dict:
        return {
            "epsilon": self.spent, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate, "max_grad_norm": self.max_grad_norm, "steps": self.ledger.steps,
            "accountant": self.accountant, "clipping": self.clipping, "epsilon_max": self.epsilon_max,
        }

    def session(self, model, optimizer, num_records: int, cfg: SiteConfig) -> _Session:
        """One private round of ``cfg.local_steps`` steps: refuses a round that would pass the budget,
        attaches Opacus to ``model``'s trainable parameters until closed, and charges the steps to the
        ledger before their noise is drawn (``_Session.step``)."""
        if num_records != self.num_records:
            raise ValueError(f"site {self.site!r}: DP-SGD was set up for {self.num_records} records, got {num_records}")
        release = (self.noise_multiplier, self.sample_rate, cfg.local_steps)
        for budget in self.budgets:
            after = self.ledger.epsilon(budget.delta, budget.accountant, release)
            if after > budget.limit:
                raise PrivacyBudgetExceeded(
                    f"site {self.site!r}: key 'dp_epsilon_max': this round's {cfg.local_steps} DP steps would spend "
                    f"ε={after:.3f} at δ={budget.delta:g} > budget {budget.limit:g} ({budget.source}; spent so far "
                    f"{self.ledger.epsilon(budget.delta, budget.accountant):.3f}); refusing to train"
                )
        return _Session(self, model, optimizer, cfg)

    def charge(self, steps: int, seed: int) -> None:
        """Charge ``steps`` steps, checked against every budget on the ledger as it is now (another job at
        this site may have charged since the session began)."""
        def within(history) -> None:
            for budget in self.budgets:
                after = epsilon(history, budget.delta, budget.accountant)
                if after > budget.limit:
                    raise PrivacyBudgetExceeded(
                        f"site {self.site!r}: key 'dp_epsilon_max': {steps} more DP step(s) would spend "
                        f"ε={after:.3f} at δ={budget.delta:g} > budget {budget.limit:g} ({budget.source}; the "
                        "ledger grew since the round began); refusing to train")

        self.ledger.charge(self.noise_multiplier, self.sample_rate, steps, check=within, site=self.site, seed=seed)


class _Session:
    """Opacus attached to one round: draw() a step's micro-batches, backward() each, step()."""

    def __init__(self, dp: DPSGD, model, optimizer, cfg: SiteConfig):
        self.dp, self.steps, self.seed = dp, cfg.local_steps, cfg.seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise DPUnsupported(f"site {dp.site!r}: DP-SGD found no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) != 1:  # checked before Opacus' hooks attach
            raise DPUnsupported(f"site {dp.site!r}: DP-SGD needs every trainable parameter on one device, got "
                                f"{sorted(map(str, devices))}; refusing to train without DP")
        self.fast = dp.clipping in ("ghost", "fast")
        try:
            if self.fast:
                self.hooks = grad_sample.GradSampleHooksFastGradientClipping(
                    model, loss_reduction="sum", max_grad_norm=dp.max_grad_norm,
                    use_ghost_clipping=dp.clipping == "ghost")
            else:
                self.hooks = grad_sample.GradSampleHooks(model, loss_reduction="sum", force_functorch=dp.clipping == "functorch")
        except (NotImplementedError, ValueError) as e:
            raise DPUnsupported(f"site {dp.site!r}: Opacus ({dp.clipping}) cannot compute per-record gradients of "
                                f"the trainable layers: {e}; refusing to train without DP") from e
        seeds = [secrets.randbits(63), secrets.randbits(63)] if dp.noise_seed is None else [
            hash((dp.noise_seed, cfg.seed, k)) & (2**63 - 1) for k in range(2)]
        # Opacus draws each step's noise like the parameters it is added to: on their device
        noise = torch.Generator(device=devices.pop()).manual_seed(seeds[0])
        sampling = torch.Generator().manual_seed(seeds[1])  # record indices are drawn on the CPU
        optimizer_cls = optimizers.DPOptimizerFastGradientClipping if self.fast else optimizers.DPOptimizer
        self.optimizer = optimizer_cls(
            optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.sample_rate * dp.num_records, loss_reduction="mean", generator=noise)
        self.sampler = iter(samplers.UniformWithReplacementSampler(
            num_samples=dp.num_records, sample_rate=dp.sample_rate, generator=sampling, steps=cfg.local_steps))
        self.noisy_steps = self.charged = 0

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close()
        if isinstance(error, NotImplementedError):  # Opacus meets a layer it cannot make private
            raise DPUnsupported(f"site {self.dp.site!r}: Opacus ({self.dp.clipping}) cannot compute per-record "
                                f"gradients of the trainable layers: {error}; refusing to train without DP") from error
        if kind is None and self.noisy_steps != self.steps:
            raise RuntimeError(f"DP-SGD: {self.noisy_steps} noisy steps taken of the round's {self.steps}")

    def close(self) -> None:
        """Detach Opacus: the model is plain again (evaluation, export, the next round)."""
        self.hooks.cleanup()
        for p in self.params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
            p.grad = None

    def draw(self) -> list[list[int]]:
        """The next step's Poisson sample as micro-batches of at most batch_size records (maybe none)."""
        indices = next(self.sampler)
        size = self.dp.batch_size
        return [indices[i:i + size] for i in range(0, len(indices), size)]

    def backward(self, losses: torch.Tensor) -> None:
        """Back-propagate one micro-batch's per-record losses and add its clipped per-record
        gradients to the step's sum (no noise yet)."""
        with warnings.catch_warnings():
            # LoRA's input is a frozen activation: torch notes its backward hook sees outputs only
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.fast:
                clipping_utils.DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "sum").backward()
            else:
                losses.sum().backward()
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Noise the step's clipped sum once, divide by the expected batch and take the optimizer step,
        each step charged before its noise is drawn: in blocks of 1, 1, 2, 4, ... steps (each block at
        most the steps already taken), so a round that stops early is charged for at most twice the
        steps it ran (the first step alone), never fewer, with a few ledger writes per round."""
        if self.noisy_steps == self.charged:
            block = min(max(1, self.charged), self.steps - self.charged)
            self.dp.charge(block, self.seed)
            self.charged += block
        for p in self.params:  # an empty contribution closes the step (Opacus' empty-batch path)
            if self.fast:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.noisy_steps += 1
