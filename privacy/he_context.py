"""CKKS keys for encrypted aggregation: where contexts come from, who may hold the secret key, raw ops.

Keys (docs/he.md). In POC and production, FLARE's provisioning writes them: the ``HEBuilder`` of
project.yml puts ``server_context.tenseal`` (parameters and relinearisation keys, no secret key)
into the server's startup kit and ``client_context.tenseal`` (with the secret key) into every
site's. The simulator has no startup kits, so :func:`provision_sim_contexts` runs the same
HEBuilder into a folder of the simulation workspace. That is for tests and demos only: the secret
key then sits on the machine that runs the server.

:class:`Ckks` drives one context through TenSEAL's SEAL bindings (``tenseal.sealapi``) instead of
``CKKSVector``, for three savings that NVFlare's HE path leaves on the table:

- two values per slot (real and imaginary part): half the ciphertexts;
- seeded symmetric encryption: an upload stores a 64-byte seed instead of its second polynomial;
- weights as exact integers (a plaintext at scale 1 multiplies without rescaling), so one data
  prime suffices: no prime is spent, and the public normalisation (1/Σ weights, p_k·s_k of a
  stacked block) is applied by the site after decryption.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from flare_lora.components.optional import load, optional

ts = optional("tenseal")  # flare-lora[he]: imported on first use
sealapi = optional("tenseal.sealapi")

SERVER_CONTEXT = "server_context.tenseal"  # names HEBuilder gives the files in the startup kits
CLIENT_CONTEXT = "client_context.tenseal"
IDENTITY_FILES = ("rootCA.pem", "he_context_id")  # same bytes at every participant of one provisioning
# N = 8192: 4096 complex slots, 8192 values per ciphertext. One 58-bit data prime holds the values
# (zstd keeps 58 bits in ~7.8 bytes per value of an upload); the second 58-bit prime is the special
# prime of the relinearisation keys HEBuilder always makes. Scale 2^36: ~1e-7 relative error, and
# aggregates up to 2^20 in magnitude (weights x values). 116 bits: far below SEAL's 218-bit bound
# for 128-bit security at N = 8192.
RECOMMENDED = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [58, 58], "scale_bits": 36}


class HEContextError(RuntimeError):
    """HE was requested but cannot be applied as configured: the job must stop, never go plaintext."""


def provision_sim_contexts(out_dir: str, **params) -> str:
    """Write server/client contexts with FLARE's own HEBuilder into ``out_dir`` (simulator only).

    ``params`` are HEBuilder's arguments (default :data:`RECOMMENDED`). A random
    ``he_context_id`` beside them plays the part of the kits' shared root certificate.
    """
    load("tenseal")  # HEBuilder needs it: one line naming flare-lora[he] where it is missing
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder(**{**RECOMMENDED, **params})
    builder.initialize(None, None)  # HEBuilder's initialize only creates the TenSEAL context
    os.makedirs(out_dir, exist_ok=True)
    for name, is_client in ((SERVER_CONTEXT, False), (CLIENT_CONTEXT, True)):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(builder.get_serialized_context(is_client=is_client))
    with open(os.path.join(out_dir, IDENTITY_FILES[1]), "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    return out_dir


def he_server_context(context_dir: str | None) -> str:
    """The server's context source: a simulator folder's file, else the startup kit's."""
    return os.path.abspath(os.path.join(context_dir, SERVER_CONTEXT)) if context_dir else SERVER_CONTEXT


def with_he_builder(project: Mapping, **params) -> dict:
    """A copy of a project.yml config whose provisioning also writes HE contexts (FLARE's HEBuilder,
    ``params`` over :data:`RECOMMENDED`), placed before the last builder (the signing one) as
    ``nvflare poc prepare --he`` does, so that the contexts are signed too."""
    load("tenseal")  # the provisioning's HEBuilder needs it
    config = copy.deepcopy(dict(project))
    builders = [b for b in config["builders"] if not str(b.get("path", "")).endswith("HEBuilder")]
    builders.insert(len(builders) - 1, {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {**RECOMMENDED, **params}})
    config["builders"] = builders
    return config


def load_context(source: str, role: str, fl_ctx=None) -> tuple[ts.Context, bytes]:
    """(context, identity bytes) for ``role`` "server" or "site"; HEContextError on any problem.

    ``source`` is an absolute path (simulator contexts) or a file name in the participant's
    startup kit, read through FLARE's SecurityContentService (signature-checked in secure mode).
    The server's context must not hold the secret key; a site's must.
    """
    if role not in ("server", "site"):
        raise ValueError(f"role: expected 'server' or 'site', got {role!r}")
    if os.path.isabs(source):
        folder = os.path.dirname(source)
        try:
            with open(source, "rb") as f:
                context = ts.context_from(f.read())
        except OSError as e:
            raise HEContextError(f"HE is on but the {role} context {source} cannot be read: {e}") from None
        except Exception as e:
            raise HEContextError(f"{role} context {source}: not a TenSEAL context ({e})") from None
    else:
        from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace
        from nvflare.fuel.sec.security_content_service import SecurityContentService

        engine = fl_ctx.get_engine() if fl_ctx is not None else None
        folder = engine.get_workspace().get_startup_kit_dir() if engine is not None else "(none)"
        try:  # FLARE's own loader: the startup kit's file, signature-checked in secure mode
            if SecurityContentService.load_content(source)[0] is None:
                raise ValueError("not found")
            context = load_tenseal_context_from_workspace(source, fl_ctx)
        except Exception as e:
            raise HEContextError(
                f"HE is on but the {role} startup kit {folder} has no usable {source} ({e}): provision the "
                f"project with FLARE's HEBuilder (with_he_builder, or `nvflare poc prepare --he`)"
            ) from None
    scheme = context.seal_context().data.first_context_data().parms().scheme().name
    if scheme != "CKKS":
        raise HEContextError(f"{role} context {source}: expected a CKKS context, got {scheme}")
    if role == "server" and context.is_private():
        raise HEContextError(
            f"server context {source} holds the secret key: the server must only get HEBuilder's "
            f"{SERVER_CONTEXT} (refusing to aggregate with a key that can decrypt every site)"
        )
    if role == "site" and not context.is_private():
        raise HEContextError(f"site context {source} has no secret key: sites need HEBuilder's {CLIENT_CONTEXT}")
    identity = b""
    for name in IDENTITY_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                identity = f.read()
            break
    return context, identity


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    """A path for SEAL's bindings, which (de)serialise through file names only: in memory on Linux."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("flare-lora-he")
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:
        fd, path = tempfile.mkstemp(prefix="flare-lora-he-")
        os.close(fd)
        try:
            yield path
        finally:
            os.remove(path)


class Ckks:
    """Encode, encrypt, serialise and combine ciphertexts of one CKKS context.

    A flat float64 vector is cut into chunks of ``2 * slots`` values; value pairs become complex
    slots. Ciphertexts leave the site at the context's first level, seeded. The server only adds
    them and multiplies them by non-negative integers (:meth:`weighted_sum`), so it needs no key
    and no prime is spent.
    """

    def __init__(self, context: ts.Context, identity: bytes = b""):
        self.context = context
        self._seal_ref = context.seal_context()  # keeps the SEAL context alive for the objects below
        self.seal = self._seal_ref.data
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.evaluator = sealapi.Evaluator(self.seal)
        self.slots = self.encoder.slot_count()
        self.chunk = 2 * self.slots
        self.scale = float(context.global_scale)
        moduli = [m.value() for m in self.seal.first_context_data().parms().coeff_modulus()]
        # the largest magnitude a decrypted aggregate may reach: the prime every ciphertext ends at,
        # over the scale, with a factor 2 margin below the wrap-around at q/2
        self.capacity = moduli[0] / (4.0 * self.scale)
        self.private = context.is_private()
        if self.private:
            self._key_ref = context.secret_key()
            self.encryptor = sealapi.Encryptor(self.seal, self._key_ref.data)
            self.decryptor = sealapi.Decryptor(self.seal, self._key_ref.data)
        digest = hashlib.sha256(repr((self.slots, moduli, self.scale)).encode() + b"|" + identity)
        self.context_id = digest.hexdigest()[:24]
        self.parameters = {"poly_modulus_degree": 2 * self.slots, "data_prime_bits": [m.bit_length() for m in moduli],
                           "scale_bits": math.log2(self.scale), "values_per_ciphertext": self.chunk}

    def num_ciphertexts(self, n: int) -> int:
        return max(1, math.ceil(n / self.chunk))

    # --- site side -----------------------------------------------------------------------

    def encrypt(self, flat: np.ndarray, bound: float) -> list[bytes]:
        """Seeded symmetric ciphertexts of ``flat`` (float64), ``chunk`` values each.

        ``bound``: the magnitude every value must stay within (what the server budgets its
        integer weights for); beyond it the aggregate could wrap around the modulus.
        """
        if not self.private:
            raise HEContextError("encrypting needs the site context (secret key)")
        peak = float(np.abs(flat).max()) if flat.size else 0.0
        if not peak <= bound:  # also catches NaN
            raise ValueError(f"a value of magnitude {peak:.3g} exceeds ±{bound:g}, the bound the server budgets "
                             f"its encrypted sums for")
        padded = np.zeros(self.num_ciphertexts(flat.size) * self.chunk)
        padded[: flat.size] = flat
        out = []
        with _scratch() as path:
            for row in padded.view(np.complex128).reshape(-1, self.slots):
                plain = sealapi.Plaintext()
                self.encoder.encode(row.tolist(), self.scale, plain)
                self.encryptor.encrypt_symmetric(plain).save(path)
                with open(path, "rb") as f:
                    out.append(f.read())
        return out

    def decrypt(self, ciphertexts: Sequence, n: int) -> np.ndarray:
        """The first ``n`` values held by ``ciphertexts``; ValueError if they decrypt out of range
        (made under another key, or tampered with: such values are ~100x beyond it)."""
        if not self.private:
            raise HEContextError("decrypting needs the site context (secret key)")
        parts = []
        for ct in ciphertexts:
            plain = sealapi.Plaintext()
            self.decryptor.decrypt(ct, plain)
            parts.append(np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128))
        flat = np.concatenate(parts).view(np.float64)[:n]
        peak = float(np.abs(flat).max()) if flat.size else 0.0
        if not peak <= 2 * self.capacity:
            raise ValueError(f"decrypted values reach {peak:.3g}, beyond the CKKS range ±{self.capacity:.3g}: "
                             f"the ciphertext was made under another key or altered")
        return flat

    # --- (de)serialisation ---------------------------------------------------------------

    def load(self, blobs: Sequence[bytes], fresh: bool = False) -> list:
        """Ciphertexts from bytes. SEAL checks they belong to this context's parameters;
        ``fresh`` also requires what a site upload looks like (first level, the context's scale)."""
        out = []
        with _scratch() as path:
            for i, blob in enumerate(blobs):
                if not isinstance(blob, (bytes, bytearray)):
                    raise ValueError(f"ciphertext {i}: expected bytes, got {type(blob).__name__}")
                with open(path, "wb") as f:
                    f.write(blob)
                ct = sealapi.Ciphertext()
                try:
                    ct.load(self.seal, path)
                except Exception as e:  # SEAL: bad header, wrong parameters, truncated or corrupt data
                    raise ValueError(f"ciphertext {i}: not a ciphertext of this CKKS context ({e})") from None
                if ct.size() != 2 or ct.scale != self.scale:
                    raise ValueError(f"ciphertext {i}: {ct.size()} polynomials at scale {ct.scale:.6g}, expected 2 "
                                     f"at the context's {self.scale:.6g}")
                if fresh and ct.parms_id() != self.seal.first_parms_id():
                    raise ValueError(f"ciphertext {i}: not at the first level, as a site's upload is")
                out.append(ct)
        return out

    def dump(self, ciphertexts: Sequence) -> list[bytes]:
        out = []
        with _scratch() as path:
            for ct in ciphertexts:
                ct.save(path)
                with open(path, "rb") as f:
                    out.append(f.read())
        return out

    # --- server side: integer-weighted sums only ---------------------------------------------

    def weighted_sum(self, terms: Sequence[tuple[Sequence, int]]) -> list:
        """Σ_k m_k · ct_k position by position (``terms``: (ciphertexts, integer m_k >= 0), equal
        lengths), moved to the last level (smallest to send). An integer encoded at scale 1
        multiplies exactly and leaves the scale as it is: nothing to rescale, no prime spent."""
        count = {len(cts) for cts, _ in terms}
        if len(count) != 1:
            raise ValueError(f"terms hold different numbers of ciphertexts: {sorted(count)}")
        for _, m in terms:
            if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                raise ValueError(f"weights of an encrypted sum must be integers >= 0, got {m!r}")
        plains: dict[tuple, sealapi.Plaintext] = {}
        out = []
        for position in range(count.pop()):
            parts = []
            for cts, m in terms:
                ct = cts[position]
                if m != 1:
                    key = (m, tuple(ct.parms_id()))
                    if key not in plains:
                        plains[key] = sealapi.Plaintext()
                        self.encoder.encode(float(m), ct.parms_id(), 1.0, plains[key])
                    prod = sealapi.Ciphertext()
                    self.evaluator.multiply_plain(ct, plains[key], prod)
                    ct = prod
                parts.append(ct)
            total = sealapi.Ciphertext()  # a new one: the inputs may be summed again (one-shot folds)
            self.evaluator.add_many(parts, total)
            out.append(total)
        return self.to_last_level(out)

    def to_last_level(self, ciphertexts: Sequence) -> list:
        """Same values, the fewest primes (a context with several data primes keeps only one)."""
        last = self.seal.last_parms_id()
        out = []
        for ct in ciphertexts:
            if ct.parms_id() != last:
                moved = sealapi.Ciphertext()
                self.evaluator.mod_switch_to(ct, last, moved)
                ct = moved
            out.append(ct)
        return out
