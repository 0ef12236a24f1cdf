"""Turn the server's metrics.json into what people read: a per-round table, a PNG, TensorBoard.

Row t (t >= 1) of the table describes training round t: each site's local training loss, the bytes
it uploaded and downloaded (as FLARE serialised them), and the evaluation of the global model that
round t produced on that site's held-out split. Row 0 is the pretrained model (zero-shot).
"""

from __future__ import annotations

import json
import math
import os


def load_metrics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def per_round(log: dict) -> list[dict]:
    """Rows {round, site, eval_loss, exact_match, mc_accuracy, train_loss, upload_bytes, download_bytes}."""
    records = list(log.get("rounds", []))
    if log.get("final"):
        records.append(log["final"])
    evals = {r["round"]: r["sites"] for r in records}
    rows = []
    for t in sorted(evals):
        train = records[t - 1]["sites"] if t >= 1 and t - 1 < len(log.get("rounds", [])) else {}
        for site in sorted(evals[t]):
            metrics = evals[t][site].get("metrics", {})
            trained = train.get(site, {})
            rows.append(
                {
                    "round": t,
                    "site": site,
                    "eval_loss": metrics.get("eval_loss"),
                    "exact_match": metrics.get("exact_match"),
                    "mc_accuracy": metrics.get("mc_accuracy"),
                    "train_loss": (trained.get("train") or {}).get("train_loss"),
                    "upload_bytes": trained.get("upload_bytes") if t else None,
                    "download_bytes": trained.get("download_bytes") if t else None,
                    "status": _status(trained) if t else "",
                }
            )
    return rows


def _status(entry: dict) -> str:
    if entry.get("rejected"):
        return "rejected"
    if entry.get("missing"):
        return "missing"
    return "" if entry else "not sampled"


def comm_totals(log: dict) -> dict:
    """Total upload and download bytes over all tasks (training rounds and the final sync)."""
    up = down = 0
    for record in list(log.get("rounds", [])) + ([log["final"]] if log.get("final") else []):
        for entry in record["sites"].values():
            up += entry.get("upload_bytes", 0)
            down += entry.get("download_bytes", 0)
    return {"upload_bytes": up, "download_bytes": down}


def format_table(rows: list[dict]) -> str:
    """One line per round and site; the multiple-choice column only where a site scored one (--eval)."""
    mc = any(r.get("mc_accuracy") is not None for r in rows)
    header = (f"{'round':>5}  {'site':<10} {'eval_loss':>9} {'exact_match':>11}" + (f" {'mc_acc':>7}" if mc else "")
              + f" {'train_loss':>10} {'up_MB':>8} {'down_MB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['round']:>5}  {r['site']:<10} {_num(r['eval_loss'], 4):>9} {_num(r['exact_match'], 3):>11}"
            + (f" {_num(r.get('mc_accuracy'), 3):>7}" if mc else "")
            + f" {_num(r['train_loss'], 4):>10} {_mb(r['upload_bytes']):>8} {_mb(r['download_bytes']):>8}"
            + (f"  {r['status']}" if r["status"] else "")
        )
    return "\n".join(lines)


def _num(value, digits: int) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):  # absent, or not a number
        return "-"
    return f"{value:.{digits}f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """PNG: eval loss and exact match per site over rounds."""
    from flare_lora.components.optional import load

    load("matplotlib").use("Agg")
    plt, MaxNLocator = load("matplotlib.pyplot"), load("matplotlib.ticker").MaxNLocator

    keys = [k for k in ("eval_loss", "exact_match", "mc_accuracy") if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for site in sorted({r["site"] for r in rows}):
            pts = [(r["round"], r[key]) for r in rows if r["site"] == site and r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=site)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = pretrained)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(rows: list[dict], path: str, title: str) -> str | None:
    """curves.png, or None (with a note) where matplotlib is not installed."""
    from flare_lora.components.optional import MissingExtra

    try:
        return plot(rows, path, title)
    except MissingExtra as e:
        print(f"curves.png not written: {e}")
        return None


def write_tensorboard(rows: list[dict], log_dir: str) -> str:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir) as writer:
        for r in rows:
            for key in ("eval_loss", "exact_match", "mc_accuracy", "train_loss", "upload_bytes", "download_bytes"):
                if r.get(key) is not None:
                    writer.add_scalar(f"{r['site']}/{key}", r[key], r["round"])
    return log_dir


def write_report(log: dict, out_dir: str, title: str = "") -> dict:
    """Write table.txt, curves.png and tensorboard/ next to metrics.json; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = per_round(log)
    table = format_table(rows)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    return {
        "table": table,
        "plot": curves(rows, os.path.join(out_dir, "curves.png"), title),
        # the scalars the job streamed live (tracking receiver), or, without them, these rows
        "tensorboard": tb if os.path.isdir(tb := os.path.join(out_dir, "tensorboard")) else write_tensorboard(rows, tb),
    }
