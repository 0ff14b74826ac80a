"""Compile once per model, not once per job: PyTorch's compile caches, persisted under `cache_dir`.

The fast sampling path compiles the decode step (torch.compile + CUDA graphs) in the first `generate` call of every
process: ~60-80 s for a 7B model (BENCHMARKS.md). On a cluster every sampling job is a new process, often on another
node whose /tmp (PyTorch's default cache location) it never saw. `torch.compiler.save_cache_artifacts()` serialises
what this process's compilations produced or used (inductor's compiled graphs with their Triton kernels, the
AOTAutograd cache, autotuning results, dynamic-shape profiles); `load_cache_artifacts()` puts such a blob into this
process's own (node-local) caches before the first call, so the compiler finds its results instead of redoing them.
(Dynamo's Python-level tracing and the CUDA-graph capture still run in each process.)

Layout: `<cache_dir>/torch_compile/<key>/<sha256 of the blob>.bin`. The key hashes everything that makes compiled
code unusable elsewhere (`compile_key_identity`): torch / CUDA / Triton / transformers / peft / Python versions,
the GPU model, the model's config and dtype, the adapters' structure, and Inductor's deterministic mode. A change
of any of them starts a new folder. Sampling compiles the plain base model (its adapters folded into the weights,
compose.FoldedAdapters), so every cell of one base model shares one key. PyTorch checks its own entries again on
load (graph, shapes, versions), so an entry that does not match is a cache miss, never a wrong result.

Safe with many jobs on many nodes at once: a blob is written to a temporary file beside its final name and renamed
onto it (atomic on POSIX file systems, Lustre included); its name is its content hash, so two jobs writing the same
blob write the same bytes, and jobs writing different blobs never touch each other's files. A reader lists only
finished `*.bin` files. Loading is best effort: an unreadable blob is logged and skipped (the job compiles instead).

PyTorch's blob does not hold the binaries of Triton kernels that run as custom ops (the decode kernel,
persona_em/sampling/decode_kernel.py): `save` also copies their Triton cache entries (`TRITON_KERNELS`) to
`<key>/triton/<triton hash>/`, and `load` copies them into this process's Triton cache. Triton finds an entry only
under the hash of its source, specialisation, compile options, target GPU and Triton version, so a copied entry is
used exactly when Triton would have compiled the same binary. Files are copied atomically, the group file (Triton's
index of an entry, holding absolute paths, rewritten to the destination) last, so a half-copied entry is a miss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

from persona_em.compose import MERGED_MARKER
from persona_em.io import atomic_path, stable_hash

log = logging.getLogger(__name__)

SUBDIR = "torch_compile"
# Config fields that name or locate a model, or mark a persona merged into its weights, but do not change the
# compiled code.
_NOT_SHAPE = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "architectures_source",
              MERGED_MARKER}
# PEFT config fields that locate an adapter but do not change its structure.
_NOT_ADAPTER = {"base_model_name_or_path", "revision", "inference_mode"}
# Triton kernels run as custom ops, whose binaries PyTorch's cache artifacts do not hold (see the module docstring).
TRITON_KERNELS = ("_decode_kernel",)


def _triton_cache_dir() -> Path | None:
    try:
        from triton import knobs
    except ImportError:
        return None
    return Path(knobs.cache.dir) if knobs.cache.dir else None


def _copy_triton_entries(src: Path, dst: Path) -> int:
    """Copy the Triton cache entries of `TRITON_KERNELS` from cache folder `src` to `dst`, those `dst` lacks;
    the number copied."""
    copied = 0
    for name in TRITON_KERNELS:
        for grp in sorted(src.glob(f"*/__grp__{name}.json")):
            entry, target = grp.parent, dst / grp.parent.name
            if (target / grp.name).exists():
                continue
            target.mkdir(parents=True, exist_ok=True)
            children = json.loads(grp.read_text())["child_paths"]
            for child in children:
                with atomic_path(target / child) as tmp:
                    tmp.write_bytes((entry / child).read_bytes())
            with atomic_path(target / grp.name) as tmp:  # last: Triton's index of the entry
                tmp.write_text(json.dumps({"child_paths": {c: str(target / c) for c in children}}))
            copied += 1
    return copied


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def _plain(value):
    """JSON-able and the same in every process: sets (PEFT's target_modules) become sorted lists; a set's own
    order follows the process's string-hash seed."""
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def compile_key_identity(model) -> dict:
    """What the key of `model`'s compile cache hashes (see the module docstring)."""
    import torch
    import torch._inductor.config as inductor_config
    from peft.tuners.tuners_utils import BaseTunerLayer

    from persona_em.compose import active_adapters, inner_model

    inner = inner_model(model)
    config = {k: v for k, v in inner.config.to_dict().items() if k not in _NOT_SHAPE}
    # PEFT leaves its config on the inner model too; it counts only while adapter layers are in the model
    # (sampling takes them out: compose.FoldedAdapters)
    configs = getattr(model, "peft_config", None) or {}
    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        configs = {}
    adapters = {}
    for name, cfg in configs.items():
        adapters[name] = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_ADAPTER}
    cuda = torch.cuda.is_available()
    return _plain({
        "python": platform.python_version_tuple()[:2],
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "transformers": _version("transformers"), "peft": _version("peft"),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "dtype": str(next(inner.parameters()).dtype),
        "config": config, "adapters": adapters,
        "active_adapters": active_adapters(model),
        # Inductor's deterministic mode (fast_generate.use_deterministic_compile) picks other kernels
        "inductor_deterministic": bool(inductor_config.deterministic),
    })


def compile_key(model) -> str:
    return stable_hash(compile_key_identity(model), 16)


def _miss_count() -> int:
    """Compilations this process did itself (not served by a cache): inductor graphs and AOTAutograd entries."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("fxgraph_cache_miss", 0)) + int(
        counters["aot_autograd"].get("autograd_cache_miss", 0))


class CompileCache:
    """The persisted compile caches of one key (`for_model`: the model's) under `root` (`<cache_dir>/torch_compile`).

    `load()` before the first compiled call; `save()` after compiled calls (it writes only when this process
    compiled something the loaded blobs did not have). With `root=None` both do nothing.
    """

    def __init__(self, root: str | os.PathLike | None, key: str):
        self.dir = Path(root) / key if root is not None else None
        self._misses_saved = 0

    @classmethod
    def for_model(cls, root: str | os.PathLike | None, model) -> "CompileCache":
        return cls(root, compile_key(model) if root is not None else "")

    def blobs(self) -> list[Path]:
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.bin") if not p.name.startswith("."))

    def load(self) -> int:
        """Put every stored blob of this key into the process's compile caches; the number loaded."""
        import torch

        loaded = 0
        for path in self.blobs():
            try:
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception as e:  # noqa: BLE001 - a bad blob costs a compilation, never the job
                log.warning("compile cache %s: not loaded (%s: %s); compiling instead", path, type(e).__name__, e)
                continue
            if info is None:
                log.warning("compile cache %s: not a cache blob of this PyTorch; compiling instead", path)
                continue
            loaded += 1
        triton_dir = _triton_cache_dir()
        if self.dir is not None and triton_dir is not None and (self.dir / "triton").is_dir():
            try:
                loaded_kernels = _copy_triton_entries(self.dir / "triton", triton_dir)
                log.info("compile cache %s: %d Triton kernel(s) loaded", self.dir, loaded_kernels)
            except Exception as e:  # noqa: BLE001 - a bad entry costs a compilation, never the job
                log.warning("compile cache %s: Triton kernels not loaded (%s: %s)", self.dir, type(e).__name__, e)
        self._misses_saved = _miss_count()
        if self.dir is not None:
            log.info("compile cache %s: %d blob(s) loaded", self.dir, loaded)
        return loaded

    def save(self) -> Path | None:
        """Write what this process compiled or used, if it compiled anything new since load/the last save."""
        import torch

        if self.dir is None or _miss_count() == self._misses_saved:
            return None
        result = torch.compiler.save_cache_artifacts()
        self._misses_saved = _miss_count()
        triton_dir = _triton_cache_dir()
        if triton_dir is not None and triton_dir.is_dir():
            _copy_triton_entries(triton_dir, self.dir / "triton")
        if result is None:
            return None
        blob = result[0]
        path = self.dir / f"{hashlib.sha256(blob).hexdigest()[:32]}.bin"
        if path.exists():
            return path
        with atomic_path(path) as tmp:  # temp file beside, renamed onto the final name: never a torn blob
            tmp.write_bytes(blob)
        log.info("compile cache: saved %s (%.1f MB)", path, len(blob) / 1e6)
        return path
