"""FLARE site filters for encrypted aggregation: decrypt what the server sends, encrypt what leaves.

``HEDecryptFilter`` (task data, every task) decrypts the global in the task, keeps the server's HE
plan for the task's result, and on the final task writes the plaintext model into the site's run
directory (``flare_lora/``): the only place a plaintext global ever exists. A task without an HE
plan (the server is not aggregating ciphertexts), with plaintext params, or made under another
context is refused before anything trains.

``HEEncryptFilter`` (task result, every task) replaces a weights result by its ciphertexts, packed
as the plan says (LoRA A/B groups, zero-padded to the round's rank, or one group per layer). The
recipe adds it after any DP filter: DP works on plaintext, and once encrypted nothing downstream
can change the values. It fails closed: no context, no plan or a value outside the CKKS range
raises, so FLARE sends no result. Metrics-only results (validation, layer scores) pass unchanged.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


from flare_lora.components.adapter_export import write_model
from flare_lora.components.algorithms.lora_init import init_seed
from flare_lora.components.algorithms.shared_a import with_shared_a
from flare_lora.privacy.he_aggregate import decrypt_payload, payload_model
from flare_lora.privacy.he_context import CLIENT_CONTEXT, Ckks, HEContextError, load_context
from flare_lora.privacy.he_packing import HE_KEY, encrypt_state

PLAN_KEY = "he"  # task meta key of the server's plan: {"context_id", "grouping", "bound", "pad_rank", "scale_b", "final",
#                  "shared_a"}
PLAN_PROP = "flare_lora_he_plan"  # the plan, handed from the task-data filter to the task-result filter
RESULTS_DIRNAME = "flare_lora"


def add_he_filters(recipe, context_dir: str | None, tasks) -> None:
    """Every site decrypts the global of each of ``tasks`` and encrypts its "train" results, after
    the filters already on "train" (FLARE runs a task's filters in the order they were added).

    ``context_dir``: simulator contexts (provision_sim_contexts), else the startup kits'. A BYOC
    job ships the whole ``flare_lora`` package with each site's trainer, the filters' code included.
    """
    context = os.path.abspath(os.path.join(context_dir, CLIENT_CONTEXT)) if context_dir else CLIENT_CONTEXT
    recipe.add_client_input_filter(HEDecryptFilter(context_file=context), tasks=list(tasks))
    recipe.add_client_output_filter(HEEncryptFilter(context_file=context), tasks=["train"])


class _SiteHE(DXOFilter):
    def __init__(self, context_file: str = CLIENT_CONTEXT):
        """context_file: the site's context, a name in its startup kit (HEBuilder's
        client_context.tenseal) or an absolute path (simulator contexts, test-only)."""
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.context_file = context_file  # FLARE's job export reads constructor args back from attributes
        self._ckks: Ckks | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._ckks = Ckks(*load_context(self.context_file, "site", fl_ctx))
            except HEContextError as e:  # stop the site before it trains, never fall back to plaintext
                self.system_panic(f"{fl_ctx.get_identity_name()}: {e}", fl_ctx)

    def _context(self, fl_ctx: FLContext) -> Ckks:
        if self._ckks is None:
            raise HEContextError(f"{fl_ctx.get_identity_name()}: HE is on but the site context is not loaded")
        return self._ckks


class HEDecryptFilter(_SiteHE):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Every task, params or not: check the server's plan and keep it for the result; then decrypt."""
        ckks, site = self._context(fl_ctx), fl_ctx.get_identity_name()
        task = from_shareable(shareable)
        plan = task.get_meta_prop(PLAN_KEY)
        if not isinstance(plan, dict):
            raise HEContextError(f"{site}: HE is on but the task has no HE plan: the server is not aggregating "
                                 f"ciphertexts; refusing to take part")
        if plan.get("context_id") != ckks.context_id:
            raise HEContextError(f"{site}: the server aggregates under another HE context ({plan.get('context_id')!r}, "
                                 f"this site holds {ckks.context_id!r}); refusing to take part")
        declared = (task.get_meta_prop("lora") or {}).get(site) if isinstance(task.get_meta_prop("lora"), dict) else None
        fl_ctx.set_prop(PLAN_PROP, {**plan, "declared": declared}, private=True, sticky=False)
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        ckks, site, plan = self._context(fl_ctx), fl_ctx.get_identity_name(), fl_ctx.get_prop(PLAN_PROP)
        params = dxo.data if isinstance(dxo.data, dict) else {}
        if HE_KEY in params:
            params = decrypt_payload(params[HE_KEY], ckks)
            if plan.get("final"):
                self._write_final(payload_model(params, shared_a_rounds(plan.get("shared_a"))), plan["final"], fl_ctx)
        elif params:
            raise HEContextError(f"{site}: HE is on but the server sent {len(params)} plaintext tensor(s); refusing them")
        dxo.data = params
        return dxo

    def _write_final(self, state: dict, final: dict, fl_ctx: FLContext) -> None:
        """The final plaintext model, in this site's run directory."""
        workspace = fl_ctx.get_engine().get_workspace()
        out = os.path.join(workspace.get_run_dir(fl_ctx.get_job_id()), RESULTS_DIRNAME)
        written = write_model(out, state, final)
        self.log_info(fl_ctx, f"HE: decrypted final model written at this site: {written}")


def shared_a_rounds(spec):
    """For the plan's {"key", "shapes"} (shared-A's final task): complete(round, B-only state), which
    adds the round's A drawn as every site drew it; None for other methods."""
    if spec is None:
        return None
    shapes = spec.get("shapes") if isinstance(spec, dict) else None
    if not isinstance(spec.get("key") if isinstance(spec, dict) else None, str) or not isinstance(shapes, dict) or \
            not all(isinstance(v, list | tuple) and len(v) == 2 for v in shapes.values()):
        raise HEContextError(f"the HE plan's shared_a entry is malformed: {str(spec)[:120]}")
    shapes = {p: (int(v[0]), int(v[1])) for p, v in shapes.items()}
    return lambda rnd, state: with_shared_a(state, init_seed(spec["key"], rnd), shapes)


class HEEncryptFilter(_SiteHE):
    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS or not dxo.data:
            return None
        ckks, site = self._context(fl_ctx), fl_ctx.get_identity_name()
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise HEContextError(f"{site}: cannot encrypt a {dxo.data_kind} result; not sending it")
        plan = fl_ctx.get_prop(PLAN_PROP)
        if not isinstance(plan, dict):
            raise HEContextError(f"{site}: no HE plan for this task (the task data was not decrypted); not sending")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                 for k, v in dxo.data.items()}
        factors = None
        if plan.get("scale_b"):  # zero-padding and shared-A weight B by s_k: a fraction, so the site applies it
            rank, alpha = dxo.get_meta_prop("rank"), dxo.get_meta_prop("alpha")
            declared = plan.get("declared")  # the server's [rank, alpha] for this site: its word, not the job code's
            if isinstance(declared, list) and len(declared) == 2:
                if (rank, alpha) != (None, None) and (rank != declared[0] or float(alpha or 0) != float(declared[1])):
                    raise HEContextError(f"{site}: the result's rank/alpha {rank}/{alpha} differ from the job's "
                                         f"{declared[0]}/{declared[1]}; not sending")
                rank, alpha = declared
            if not rank or not alpha:
                raise HEContextError(f"{site}: the result declares no rank/alpha to scale B by; not sending")
            factors = {"B": float(alpha) / float(rank)}
        wire = encrypt_state(state, ckks, plan.get("grouping", "lora"), plan.get("pad_rank"), plan["bound"], factors)
        count = sum(len(g["ciphertexts"]) for g in wire["groups"].values())
        self.log_info(fl_ctx, f"HE: {site} encrypted {sum(t.numel() for t in state.values())} values of "
                              f"{len(state)} tensors into {count} ciphertext(s)")
        dxo.data = {HE_KEY: wire}
        return dxo
