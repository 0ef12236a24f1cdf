"""The one local train / eval loop that every federated method shares.

Loss is cross-entropy on answer tokens only (prompt labels are -100), summed over tokens and
divided by the step's supervised token count, so long and short answers weigh per token, however
the step is split into micro-batches. Logits are computed only at supervised positions: the
vocabulary projection is a fifth of a small model's compute and the prompt needs none of it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flare_lora.components.data.prompts import IGNORE_INDEX, collate, encode, exact_match, prompt_ids
from flare_lora.components.data.records import reference
from flare_lora.components.training.multiple_choice import accuracy, load_questions, load_shots
from flare_lora.components.training.config import SiteConfig


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (None leaves them); inter-op too while torch still allows it."""
    if n is None:
        return
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable once, before any parallel work has started
        pass


def _loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's supervised tokens, and their count."""
    sums, counts = _sample_losses(model, batch)
    return sums.sum(), int(counts.sum())


def _sample_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record summed answer cross-entropy and supervised token counts."""
    device = next(model.parameters()).device  # a GPU rank's model (components/flare/ddp.py)
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=positions,
        use_cache=False,
    ).logits
    targets = targets[:, positions]
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return loss.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def _cycle(n: int, seed: int):
    """Indices 0..n-1 in a fresh seeded shuffle per epoch, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def train_lora(model, tokenizer, records: list[dict], cfg: SiteConfig, *, desc: str = "train", dp=None) -> dict:
    """Run cfg.local_steps AdamW steps on the trainable (LoRA) parameters; deterministic in cfg.seed.

    Each step accumulates cfg.grad_accum micro-batches of cfg.batch_size records. Returns
    train_loss (mean over the last quarter of the steps), steps, tokens (supervised),
    input_tokens (non-padding), seconds and tokens_per_s (supervised tokens per second).

    ``dp`` (``flare_lora.privacy.dp_sgd.DPSGD``) makes the steps differentially private: Poisson-sampled
    records (micro-batches of at most cfg.batch_size), each record's loss its own token mean (a
    step-wide token count would couple the records and void the per-record sensitivity), per-record
    gradients clipped and noised by Opacus; the stats then carry ``dp`` (ε spent, σ, q, ...).
    """
    if not records:
        raise ValueError("train_lora: got no training records")
    set_threads(cfg.threads)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = _cycle(len(records), cfg.seed)
    encoded: dict[int, dict] = {}  # only the records this round reaches get tokenized
    pad_id = tokenizer.pad_token_id
    losses, tokens, input_tokens = [], 0, 0
    start = time.perf_counter()
    model.train()
    session = dp.session(model, optimizer, len(records), cfg) if dp is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), tqdm(total=cfg.local_steps, desc=desc, file=sys.stderr) as bar, \
            session as private:
        torch.manual_seed(cfg.seed)  # LoRA dropout
        for _ in range(cfg.local_steps):
            draws = private.draw() if private is not None else [
                [next(order) for _ in range(cfg.batch_size)] for _ in range(cfg.grad_accum)
            ]
            batches = []
            for indices in draws:
                for i in indices:
                    if i not in encoded:
                        encoded[i] = encode(tokenizer, records[i], cfg.max_length)
                batches.append(collate([encoded[i] for i in indices], pad_id))
            n_step = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                if private is not None:
                    sums, counts = _sample_losses(model, batch)
                    private.backward(sums / counts.clamp(min=1))
                    loss = sums.detach().sum()
                else:
                    loss, _ = _loss_sum(model, batch)
                    (loss / max(n_step, 1)).backward()
                step_loss += loss.item()
                input_tokens += int(batch["attention_mask"].sum())
            if private is not None:
                private.step()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += n_step
            if batches:  # a Poisson draw can be empty: a noise-only step with no loss to report
                losses.append(step_loss / max(n_step, 1))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-")
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-math.ceil(len(losses) / 4):] or [math.nan]
    stats = {
        "train_loss": sum(tail) / len(tail),
        "steps": cfg.local_steps,
        "tokens": tokens,
        "input_tokens": input_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
    if dp is not None:
        stats["dp"] = dp.report()
    return stats


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], cfg: SiteConfig) -> dict:
    """eval_loss (token-weighted answer cross-entropy), perplexity and n; plus exact_match from
    greedy generation when the records carry reference answers. At most cfg.max_eval records."""
    records = records[: cfg.max_eval] if cfg.max_eval is not None else records
    if not records:
        raise ValueError("evaluate: got no evaluation records")
    set_threads(cfg.threads)
    model.eval()
    pad_id = tokenizer.pad_token_id
    encoded = [encode(tokenizer, r, cfg.max_length) for r in records]
    encoded.sort(key=lambda e: len(e["input_ids"]))  # batches of similar length: less padding
    loss_sum, n_tokens = 0.0, 0
    for i in range(0, len(encoded), cfg.eval_batch_size):
        loss, n = _loss_sum(model, collate(encoded[i : i + cfg.eval_batch_size], pad_id))
        loss_sum, n_tokens = loss_sum + loss.item(), n_tokens + n
    eval_loss = loss_sum / n_tokens if n_tokens else math.nan
    result = {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss), "n": len(records)}
    scored = [r for r in records if reference(r) is not None]
    if scored:
        predictions = generate_answers(model, tokenizer, scored, cfg)
        hits = sum(exact_match(p, reference(r)) for p, r in zip(predictions, scored))
        result["exact_match"] = hits / len(scored)
    if cfg.eval_mc:
        questions, shots = mc_questions(cfg.eval_mc, cfg.eval_mc_limit, cfg.eval_mc_shots)
        mc = accuracy(model, tokenizer, questions, shots=shots, k=cfg.eval_mc_shots, batch_size=cfg.eval_batch_size,
                      style=cfg.eval_mc_style)
        result.update(mc_accuracy=mc["accuracy"], mc_n=mc["n"])
    return result


@functools.lru_cache(maxsize=2)
def mc_questions(path: str, limit: int | None, shots: int) -> tuple[dict, dict]:
    """The multiple-choice questions (and solved examples) a site scores every round, read once."""
    return load_questions(path, limit=limit), load_shots(path) if shots else {}


def generate_answers(model, tokenizer, records: list[dict], cfg: SiteConfig) -> list[str]:
    """Greedy answers, batched with left padding (prompts end where generation starts)."""
    prompts = [prompt_ids(tokenizer, r)[-cfg.max_length :] for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id
    answers = [""] * len(prompts)
    for start in range(0, len(order), cfg.eval_batch_size):
        chunk = order[start : start + cfg.eval_batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
        device = next(model.parameters()).device
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, row in zip(chunk, out[:, width:]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def layer_scores(model, tokenizer, records: list[dict], cfg: SiteConfig, params_by_layer: dict, *,
                 batches: int, seed: int) -> dict:
    """Per-layer gradient statistics of the answer loss on ``batches`` local batches.

    ``params_by_layer`` is {layer: {name: parameter}} (e.g. ``lora.score_parameters``); frozen
    parameters are unfrozen for the measurement and restored after. Each batch holds
    cfg.batch_size records drawn like training draws them (seeded shuffle). Returns lists over
    the K layers:

    - ``grad_sq``: ‖g_l‖², the squared norm of the layer's gradient of the token-averaged loss
      over all the batches together (the selective criterion);
    - ``weight_sq``: ‖w_l‖² (relative gradient norm RGN = grad_sq / weight_sq);
    - ``batch_norms``: [batches][K] the per-batch gradient norms ‖g_l,b‖ (SNR = mean / std);
    plus ``tokens`` and ``seconds``. No optimizer step and no ``.grad`` is touched.
    """
    if not records:
        raise ValueError("layer_scores: got no records")
    if batches < 1:
        raise ValueError(f"layer_scores: batches must be >= 1, got {batches}")
    set_threads(cfg.threads)
    layers = sorted(params_by_layer)
    flat = [(layer, p) for layer in layers for p in params_by_layer[layer].values()]
    params = [p for _, p in flat]
    flags = [p.requires_grad for p in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    order = _cycle(len(records), seed)
    pad_id = tokenizer.pad_token_id
    batch_norms, total = [], 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout: the score measures the model, not a noise draw
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(batches):
                batch = collate([encode(tokenizer, records[next(order)], cfg.max_length)
                                 for _ in range(cfg.batch_size)], pad_id)
                loss, n = _loss_sum(model, batch)
                grads = torch.autograd.grad(loss / max(n, 1), params, allow_unused=True)
                sq = dict.fromkeys(layers, 0.0)
                for (layer, _), g, a in zip(flat, grads, acc):
                    if g is not None:
                        sq[layer] += float(g.float().pow(2).sum())
                        a.add_(g.float(), alpha=n)
                batch_norms.append([math.sqrt(sq[layer]) for layer in layers])
                total += n
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    grad_sq = dict.fromkeys(layers, 0.0)
    weight_sq = dict.fromkeys(layers, 0.0)
    for (layer, p), a in zip(flat, acc):
        grad_sq[layer] += float(a.div_(max(total, 1)).pow(2).sum())
        weight_sq[layer] += float(p.detach().float().pow(2).sum())
    return {
        "grad_sq": [grad_sq[layer] for layer in layers],
        "weight_sq": [weight_sq[layer] for layer in layers],
        "batch_norms": batch_norms,
        "tokens": total,
        "seconds": time.perf_counter() - start,
    }


def layer_criterion(stats: dict, criterion: str) -> list[float]:
    """The K numbers a site reports for a selection criterion, from ``layer_scores`` output.

    "grad_norm": ‖g_l‖²; "rgn": ‖g_l‖² / ‖w_l‖²; "snr": mean / std of the per-batch gradient
    norms (needs >= 2 batches; std is the population std plus 1e-12).
    """
    if criterion == "grad_norm":
        return list(stats["grad_sq"])
    if criterion == "rgn":
        return [g / w if w > 0 else 0.0 for g, w in zip(stats["grad_sq"], stats["weight_sq"])]
    if criterion == "snr":
        norms = stats["batch_norms"]
        if len(norms) < 2:
            raise ValueError(f"criterion 'snr' needs >= 2 score batches, got {len(norms)}")
        out = []
        for column in zip(*norms):
            mean = sum(column) / len(column)
            std = math.sqrt(sum((x - mean) ** 2 for x in column) / len(column))
            out.append(mean / (std + 1e-12))
        return out
    raise ValueError(f"criterion: expected 'grad_norm', 'rgn' or 'snr', got {criterion!r}")
