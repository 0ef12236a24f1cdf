"""HE precision at the magnitudes LoRA factors really have: absolute and relative error of an
encrypted weighted mean, by value magnitude, on a trained adapter's own tensors.

CKKS noise is absolute: a decrypted value carries an error of about the same size whatever the
value, so the relative error depends on the value's magnitude. This script takes the factors of
a trained adapter (default: the demo's, ``python nvflare_jobs/flora/job.py`` writes
``results/flora/adapter``), makes 3 site updates with its magnitudes (the adapter itself and two
copies with random signs per entry), aggregates them encrypted exactly as a FedIT round does
(flare_lora.privacy.he_packing / he_server / he_aggregate, the recommended context: N = 8192,
[58, 58], scale 2^36, example counts 20/30/45) and compares the decrypted mean with the float64
mean.

    python benchmarks/he_precision.py                                  # the demo's adapter
    python benchmarks/he_precision.py --adapter path/to/adapter_dir    # any PEFT adapter
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

WEIGHTS = (20, 30, 45)  # no signed combination sums to 0
BANDS = [(0, 1e-6), (1e-6, 1e-5), (1e-5, 1e-4), (1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1e-1), (1e-1, np.inf)]


def sites_from(adapter: dict[str, torch.Tensor], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    flips = [{k: torch.randint(0, 2, v.shape, generator=g).float() * 2 - 1 for k, v in adapter.items()} for _ in range(2)]
    return [adapter] + [{k: v * f[k] for k, v in adapter.items()} for f in flips]


def encrypted_mean(sites: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from flare_lora.components.strategies import SiteUpdate, get_method
    from flare_lora.privacy.he_aggregate import decrypt_payload
    from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, Ckks, load_context, provision_sim_contexts
    from flare_lora.privacy.he_packing import HE_KEY, EncryptedUpdate, encrypt_state
    from flare_lora.privacy.he_server import EncryptedRounds, open_server_context

    with tempfile.TemporaryDirectory() as folder:
        provision_sim_contexts(folder)
        server = open_server_context(os.path.join(folder, SERVER_CONTEXT))
        site = Ckks(*load_context(os.path.join(folder, CLIENT_CONTEXT), "site"))
    he = EncryptedRounds(get_method("fedit"), server)
    updates = [SiteUpdate(f"site-{k}", EncryptedUpdate.from_wire(encrypt_state(s, site), server, fresh=True), n, 1, 1.0)
               for k, (s, n) in enumerate(zip(sites, WEIGHTS))]
    params = decrypt_payload(he.payload([he.aggregate(updates)], 0)[HE_KEY], site)
    return params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="results/flora/adapter", help="a PEFT adapter folder")
    args = p.parse_args(argv)
    path = os.path.join(args.adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        print(f"error: {path} not found (run `python nvflare_jobs/flora/job.py` first, or pass --adapter)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    adapter = {k: v.float() for k, v in load_file(path).items()}
    sites = sites_from(adapter)
    exact = {k: sum(s[k].double() * (w / sum(WEIGHTS)) for s, w in zip(sites, WEIGHTS)) for k in adapter}
    got = encrypted_mean(sites)
    values = np.concatenate([exact[k].reshape(-1).numpy() for k in adapter])
    errors = np.concatenate([(got[k].double() - exact[k]).abs().reshape(-1).numpy() for k in adapter])
    magnitude = np.abs(values)
    print(f"adapter {args.adapter}: {len(adapter)} tensors, {values.size} values")
    for part in ("lora_A", "lora_B"):
        m = np.concatenate([exact[k].abs().reshape(-1).numpy() for k in adapter if part in k])
        print(f"  |{part}| of the mean: median {np.median(m):.2e}, 1% {np.quantile(m, 0.01):.2e}, "
              f"99% {np.quantile(m, 0.99):.2e}, max {m.max():.2e}")
    print(f"absolute error per value: median {np.median(errors):.2e}, 99% {np.quantile(errors, 0.99):.2e}, "
          f"max {errors.max():.2e}")
    print("\n| |value| band | values | median abs error | median relative error | 99% relative error |")
    print("|---|---|---|---|---|")
    for lo, hi in BANDS:
        sel = (magnitude >= lo) & (magnitude < hi) & (magnitude > 0)
        if sel.any():
            rel = errors[sel] / magnitude[sel]
            print(f"| [{lo:g}, {hi:g}) | {int(sel.sum())} | {np.median(errors[sel]):.2e} | {np.median(rel):.2e} | "
                  f"{np.quantile(rel, 0.99):.2e} |")
    frob = np.array([float((got[k].double() - exact[k]).norm() / exact[k].norm()) for k in adapter if exact[k].norm() > 0])
    print(f"\nper-tensor relative error ||decrypted - exact|| / ||exact||: median {np.median(frob):.2e}, max {frob.max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
