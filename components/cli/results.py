"""A finished job's results: copied out of the run workspace, reported (table, curves, TensorBoard),
optionally merged into the base model; and ``flare-lora report``, the same report of a results folder."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from flare_lora.components.report import comm_totals, load_metrics, write_report

METRICS_GLOB = os.path.join("**", "flare_lora", "metrics.json")
# what metrics.json names as the final model, and the only name the server ever writes for each: a
# results log naming anything else (a path outside the folder) is not followed
MODEL_FILES = {"adapter": "adapter", "layers_file": "layers.safetensors", "full_weights": "global.safetensors"}
RESULTS_MARKER = ".flare_lora_results"  # in every results folder this command wrote: the entries it wrote


def check_results_dir(out_dir: str, overwrite: bool = False) -> None:
    """ValueError unless ``out_dir`` is absent or empty, or (``overwrite``) a results folder
    flare-lora wrote: a run never replaces an earlier one unasked, and nothing a user did not create
    is ever deleted."""
    path = os.path.realpath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--results {out_dir}: exists and is not a folder")
    if os.path.realpath(os.getcwd()).startswith(path.rstrip(os.sep) + os.sep) or path == os.path.realpath(os.getcwd()):
        raise ValueError(f"--results {out_dir}: is the current folder or holds it; choose a new or empty folder")
    present = set(files_in(path)) if os.path.isdir(path) else set()
    foreign = sorted(present - written_files(path))
    if foreign:
        raise ValueError(f"--results {out_dir}: holds files flare-lora did not write ({foreign[:3]}"
                         f"{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder")
    if present and not overwrite:
        raise ValueError(f"--results {out_dir}: holds an earlier run's results{_started(path)}; pass --overwrite to "
                         "replace them, or --results NEW_DIR")


def _started(path: str) -> str:
    try:
        with open(os.path.join(path, "run_config.json"), encoding="utf-8") as f:
            return f" (started {json.load(f)['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def files_in(path: str) -> list[str]:
    """Every file under ``path`` (links too, not followed), relative to it."""
    return [os.path.relpath(os.path.join(folder, name), path)
            for folder, dirs, files in os.walk(path) for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]]


def written_files(path: str) -> set[str]:
    """The files flare-lora wrote in a results folder, as its marker (a JSON list) names them, with
    the marker itself. An earlier version's empty marker stood for the whole folder."""
    marker = os.path.join(path, RESULTS_MARKER)
    if not os.path.isfile(marker):
        return set()
    with open(marker, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return set(files_in(path))
    try:
        listed = json.loads(text)
    except ValueError:
        return {RESULTS_MARKER}
    return {RESULTS_MARKER, *(p for p in listed if isinstance(p, str))} if isinstance(listed, list) else {RESULTS_MARKER}


def mark_results(out_dir: str, files: set[str] | None = None) -> None:
    """Name in the marker the files this run wrote (default: every file now in ``out_dir``)."""
    files = set(files_in(out_dir)) if files is None else files
    with open(os.path.join(out_dir, RESULTS_MARKER), "w", encoding="utf-8") as f:
        json.dump(sorted(files - {RESULTS_MARKER}), f, indent=0)


def collect_results(result_dir: str | None, out_dir: str, overwrite: bool = False) -> dict:
    """Copy the server's flare_lora/ results out of a run workspace into ``out_dir``; their log.
    With HE only the sites hold the plaintext model (in the simulator, in the same workspace): copy
    it too, and the log names it."""
    found = sorted(glob.glob(os.path.join(result_dir or "", METRICS_GLOB), recursive=True)) if result_dir else []
    if not found:
        raise SystemExit(f"no flare_lora/metrics.json under the job result {result_dir!r}; see the server log there")
    src = os.path.dirname(found[0])
    if os.path.abspath(src) != os.path.abspath(out_dir):
        check_results_dir(out_dir, overwrite)  # again: the job ran for a while
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # empty, or results this command wrote
        shutil.copytree(src, out_dir, symlinks=True)  # a link the job left stays a link, never followed
        mark_results(out_dir)
    copy_tracking(result_dir, src, out_dir)
    log = load_metrics(os.path.join(out_dir, "metrics.json"))
    for key, name in MODEL_FILES.items():  # the server writes these names only; anything else is not followed
        if key in log and log[key] != name:
            print(f"warning: metrics.json names {key} {str(log[key])[:80]!r}; expected {name!r}: ignored")
            log.pop(key)
    if not log.get("model_at_sites"):
        return log
    for key, name in MODEL_FILES.items():
        found = glob.glob(os.path.join(result_dir, "**", "flare_lora", name), recursive=True)
        at_sites = sorted(p for p in found if not os.path.abspath(p).startswith(os.path.abspath(src) + os.sep))
        if at_sites and not os.path.exists(os.path.join(out_dir, name)):
            if os.path.isdir(at_sites[0]):
                shutil.copytree(at_sites[0], os.path.join(out_dir, name), symlinks=True)
            else:
                shutil.copy(at_sites[0], os.path.join(out_dir, name))
            log[key] = name
            print(f"HE: {name} decrypted at a site: {at_sites[0]}")
    return log


TRACKING_OUTPUTS = {"tb_events": "tensorboard", "mlflow.db": "mlflow.db"}  # the server's receiver -> results


def copy_tracking(result_dir: str, src: str, out_dir: str) -> None:
    """What the job's tracking receiver wrote on the server (TensorBoard events, the MLflow store),
    into ``out_dir``: the same scalars the sites streamed while the job ran."""
    server_run = os.path.dirname(os.path.abspath(src))
    for name, dest in TRACKING_OUTPUTS.items():
        found = sorted(glob.glob(os.path.join(server_run, "**", name), recursive=True))
        if found and not os.path.exists(os.path.join(out_dir, dest)):
            if os.path.isdir(found[0]):
                shutil.copytree(found[0], os.path.join(out_dir, dest), symlinks=True)
            elif not os.path.islink(found[0]):
                shutil.copy(found[0], os.path.join(out_dir, dest))


def report_results(log: dict, out_dir: str, title: str) -> dict:
    """Write table.txt, curves.png and tensorboard/ of ``log`` into out_dir; what print_report prints."""
    report = write_report(log, out_dir, title)
    report.update(log=log, comm=comm_totals(log), out_dir=out_dir)
    return report


def save_merged(model: str | None, out_dir: str, log: dict) -> str | None:
    """``--save-merged``: the base model with the trained weights (adapter merged, or trained
    layers / all weights replaced) as an HF model dir; None when the job wrote no model."""
    name = next((name for key, name in MODEL_FILES.items() if log.get(key) == name), None)
    if name is None or not os.path.exists(os.path.join(out_dir, name)) or os.path.islink(os.path.join(out_dir, name)):
        return None
    from flare_lora.components.adapter_export import save_full_model, save_merged_model
    from flare_lora.components.training.models import resolve_model_dir

    save = save_merged_model if os.path.isdir(os.path.join(out_dir, name)) else save_full_model
    return save(resolve_model_dir(model), os.path.join(out_dir, name), os.path.join(out_dir, "merged"))


def print_report(report: dict) -> None:
    """Where the results are, what was rejected or cut, the traffic; the table last."""
    log = report["log"]
    print(f"results: {report['out_dir']} (run_config.json, metrics.json, table.txt, curves.png, tensorboard/)")
    if log.get("adapter"):
        print(f"adapter: {os.path.join(report['out_dir'], log['adapter'])}  "
              "(AutoPeftModelForCausalLM.from_pretrained(that_dir); flare_lora.load(results))")
    elif log.get("model_at_sites"):
        print(f"HE: the server holds the global only as ciphertexts; the model: {log['model_at_sites']}")
    if report.get("merged"):
        print(f"merged model: {report['merged']}  (AutoModelForCausalLM.from_pretrained(that_dir))")
    if log.get("selections"):
        print_selections(log)
    cut = truncation(log)
    if cut:
        print("records longer than max_length (cut in training): " + ", ".join(f"{s} {n}" for s, n in sorted(cut.items())))
    comm = report["comm"]
    print(f"total upload {comm['upload_bytes'] / 1e6:.2f} MB, download {comm['download_bytes'] / 1e6:.2f} MB\n")
    print(report["table"])


def truncation(log: dict) -> dict[str, int]:
    """Each site's count of training records longer than max_length, as it last reported (sites
    under DP withhold it); only sites that cut any."""
    cut = {}
    for record in log.get("rounds", []):
        for site, entry in record.get("sites", {}).items():
            n = (entry.get("train") or {}).get("truncated") if isinstance(entry.get("train"), dict) else None
            if isinstance(n, int) and not isinstance(n, bool):
                cut[site] = n
    return {site: n for site, n in cut.items() if n}


def print_selections(log: dict) -> None:
    """A selective-layer job's per-round layer choice per site, and the sites whose results it rejected."""
    k = log.get("num_layers") or 0
    lam = f", λ={log.get('lam')}" if log.get("selection") == "selective" else ""
    print(f"\nlayer selections ({log.get('selection')}, mode {log.get('mode')}{lam}, K={k}):")
    for sel in log["selections"]:
        print(f"  round {sel['round']}: inconsistency {sel['inconsistency']}, objective {sel['objective']:.3f}, "
              f"solver {sel['solver']} {sel['seconds'] * 1e3:.1f} ms")
        for site in sel["sites"]:
            layers = set(sel["layers"][site])
            bar = "".join("#" if layer in layers else "." for layer in range(k))
            print(f"    {site:<10} b={sel['budgets'][site]:<3} {bar}  {sorted(layers)}  "
                  f"captured {sel['captured'][site]:.2f}")
    for record in log.get("rounds", []):
        for site, entry in sorted(record["sites"].items()):
            if entry.get("rejected") or entry.get("score_rejected"):
                print(f"  round {record['round']}: rejected {site}: {entry.get('rejected') or entry.get('score_rejected')}")


def report_main(argv=None) -> int:
    """``flare-lora report RESULTS_DIR``: the table, curves and TensorBoard scalars of a job's results."""
    p = argparse.ArgumentParser(prog="flare-lora report", description=report_main.__doc__)
    p.add_argument("results_dir", help="a job's results folder (holding metrics.json)")
    p.add_argument("--title", default=None, help="title of curves.png (default: the folder's name)")
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="print N generation samples per site from its held-out data on this machine (0: none)")
    p.add_argument("--data", default=None, help="the sites' data dir, where the run's is elsewhere (for --samples)")
    args = p.parse_args(argv)
    try:
        log = load_metrics(os.path.join(args.results_dir, "metrics.json"))
    except (OSError, ValueError) as e:  # no or unreadable metrics.json
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = set(files_in(args.results_dir)) if os.path.isdir(args.results_dir) else set()
    print_report(report_results(log, args.results_dir, args.title or os.path.basename(os.path.abspath(args.results_dir))))
    if log.get("error"):
        print(f"the job FAILED: {log['error']}")
    if args.samples > 0 and not log.get("error"):
        from flare_lora.components.cli.samples import print_samples
        from flare_lora.components.optional import MissingExtra

        try:
            print_samples(args.results_dir, args.samples, args.data)
        except (OSError, ValueError, MissingExtra) as e:  # the base model or the data is not on this machine
            print(f"samples: none ({e}); --samples 0 skips them")
    listed = written_files(args.results_dir)
    if listed:  # a folder a run wrote: what the report added is flare-lora's too
        mark_results(args.results_dir, listed | (set(files_in(args.results_dir)) - before))
    return 0
