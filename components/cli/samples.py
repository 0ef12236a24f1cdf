"""Generation samples for ``flare-lora report``: the final model answering a few of each site's
held-out prompts, next to the reference. Read on this machine, from the data the run named (the
embedded tasks by default); nothing is sent by the sites to produce them."""

from __future__ import annotations

import json
import os


def print_samples(results_dir: str, n: int, data: str | None = None) -> None:
    """Up to ``n`` samples per site of the run in ``results_dir``; a site whose data is not on this
    machine is named and skipped."""
    from flare_lora.components.data.records import DataError, reference
    from flare_lora.components.data.site_data import load_site_data
    from flare_lora.components.loading import load
    from flare_lora.components.training.config import SiteConfig
    from flare_lora.components.training.trainer import generate_answers

    try:
        with open(os.path.join(results_dir, "run_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        print("samples: no run_config.json in the results (an older run): no samples")
        return
    model, tokenizer = load(results_dir)
    data = data or config.get("options", {}).get("data")
    print(f"\ngeneration samples (greedy, the final model, {n} held-out records per site):")
    for index, (site, settings) in enumerate(config.get("sites", {}).items()):
        try:
            _, held_out = load_site_data(data, site, index, seed=settings.get("seed", 0))
        except (DataError, OSError) as e:
            print(f"  {site}: its data is not on this machine ({e}); --data DIR names it")
            continue
        records = [r for r in held_out if reference(r) is not None][:n]
        cfg = SiteConfig.from_dict({k: v for k, v in settings.items() if k in ("max_length", "max_new_tokens")}, site)
        for record, answer in zip(records, generate_answers(model, tokenizer, records, cfg)):
            asked = record["messages"][-2]["content"] if len(record.get("messages", [])) > 1 else ""
            question = record.get("instruction") or record.get("prompt") or asked
            print(f"  {site}: {_short(question)!r}\n      answer {_short(answer)!r}  reference {_short(reference(record))!r}")


def _short(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
