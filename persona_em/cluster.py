"""Running on a SLURM cluster (Leonardo): what the controller checks before submitting, and the environment of a
compute job.

Compute nodes have no internet. Every download is a login-side rule (localrules) writing into `cache_dir`; a job
running on a compute node gets the offline switches below, so a library that would reach for the hub fails at
once instead of hanging, and our own loaders name the missing file (see `require_local`).
"""
from __future__ import annotations

import os
from pathlib import Path

from persona_em.errors import UserError

ACCOUNT_ENV = "PERSONA_EM_ACCOUNT"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}


def compute_job_env(cache_dir: str) -> dict[str, str]:
    """Environment of a job on a compute node: offline, with the Hugging Face cache on the project's storage."""
    return {**OFFLINE_ENV, "HF_HOME": str(Path(cache_dir).resolve() / "huggingface")}


def in_cluster_job(workflow) -> bool:
    """True in the Snakemake process that runs a job inside a SLURM allocation (not in the controller, even when
    the controller itself runs inside an allocation, and not on a workstation)."""
    from snakemake_interface_executor_plugins.settings import ExecMode

    return workflow.exec_mode != ExecMode.DEFAULT and bool(os.environ.get("SLURM_JOB_ID"))


def enter_compute_job(workflow, cache_dir: str) -> None:
    """Called while the Snakefile is parsed: set the offline environment before any rule script imports a hub
    library (they read these variables at import time)."""
    if in_cluster_job(workflow):
        os.environ.update(compute_job_env(cache_dir))


def import_from_checkout(workflow) -> None:
    """Called while the Snakefile is parsed: put the checkout on PYTHONPATH, so that every job's script imports this
    persona_em, in the venv `make` builds and in the conda environments of envs/ (which do not install it) alike,
    locally and in SLURM jobs (which inherit the environment and parse the Snakefile again).

    In conda environments PYTHONPATH is the checkout alone (nothing else from the calling shell may leak into
    them); the profiles set `conda-not-block-search-path-envvars`, without which Snakemake would drop it."""
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    basedir = str(workflow.basedir)
    conda = DeploymentMethod.CONDA in (workflow.deployment_settings.deployment_method or ())
    others = [] if conda else [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != basedir]
    os.environ["PYTHONPATH"] = os.pathsep.join([basedir, *others])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def require_local(path: str | Path, what: str, marker: str | None = None) -> Path:
    """A file or directory a compute job needs: it must already be on disk (nothing can be downloaded there)."""
    path = Path(path)
    missing = not path.exists() or (marker is not None and not (path / marker).exists())
    if missing:
        where = "this compute node has no network" if offline() else "it is produced by a login-side rule"
        raise UserError(
            f"{what} is missing: {path}{'/' + marker if marker else ''} ({where}). Run the fetch rules on the login "
            f"node first, e.g. `snakemake --profile profiles/leonardo --forcerun prepare_model --until prepare_model`"
        )
    return path


# --- controller-side checks (onstart, before anything is submitted) ----------------------------------------------
def _raw(resource) -> str | None:
    raw = getattr(resource, "raw", resource)
    return None if raw is None else str(raw)


def account_problem(default_resources: dict, no_account: bool) -> str | None:
    """Why the SLURM account is not usable, or None. Leonardo refuses jobs without an account."""
    raw = _raw(default_resources.get("slurm_account")) if default_resources else None
    value = os.path.expandvars(raw).strip().strip("'\"") if raw else ""
    if value and "$" not in value:
        return None
    if no_account:
        return None
    return (f"no SLURM account set: export {ACCOUNT_ENV}=<your project account> (see `saldo -b`), or pass "
            f"--default-resources slurm_account=<account>; a cluster without accounts needs --slurm-no-account")


def unmapped_rules(rules, localrules, overwrite_resources) -> list[str]:
    """Rules that would be submitted as SLURM jobs but have no entry under the profile's set-resources."""
    return sorted(r.name for r in rules
                  if not r.norun and r.name not in localrules and r.name not in overwrite_resources)


def check_submission(workflow) -> None:
    """Refuse to start a SLURM run that would submit jobs without an account or without per-rule resources."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    rs = workflow.resource_settings
    problems = []
    account = account_problem(dict(rs.default_resources or {}),
                              bool(getattr(workflow.executor_settings, "no_account", False)))
    if account:
        problems.append(account)
    unmapped = unmapped_rules(workflow.rules, workflow._localrules, dict(rs.overwrite_resources))
    if unmapped:
        problems.append(f"rules without a resources mapping in the profile's set-resources: {', '.join(unmapped)} "
                        f"(add them to profiles/leonardo/config.yaml: partition, qos, runtime, memory, GPUs)")
    if problems:
        raise UserError("; ".join(problems))


# --- gpu_smoke ---------------------------------------------------------------------------------------------------
def visible_gpus() -> tuple[int, str]:
    """(number of GPUs this process can use, how it was counted)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "torch.cuda.device_count()"
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(devices), "CUDA_VISIBLE_DEVICES (no CUDA runtime in this process)"


def gpu_smoke(requested: int, out: str) -> None:
    """Fail unless the job sees exactly the GPUs it asked for (the SLURM plugin has an open report of a 2-GPU
    request that saw one)."""
    import logging
    import socket

    from persona_em.io import write_json

    seen, how = visible_gpus()
    report = {"requested": requested, "seen": seen, "counted_by": how, "host": socket.gethostname(),
              **{k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_GPUS_ON_NODE",
                                                 "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_CPUS_PER_TASK",
                                                 *OFFLINE_ENV, "HF_HOME")}}
    logging.getLogger(__name__).info("gpu_smoke: %s", report)
    if seen != requested:
        raise UserError(f"gpu_smoke: the job asked for {requested} GPU(s) but sees {seen} ({how}; "
                        f"SLURM_JOB_GPUS={report['SLURM_JOB_GPUS']}, CUDA_VISIBLE_DEVICES={report['CUDA_VISIBLE_DEVICES']})")
    write_json(out, report)


def check_cache_writable(workflow, cache_dir: str) -> None:
    """Before any job starts: if a job of this run writes into cache_dir, the directory must be writable (a shared
    read-only cache that already holds everything is fine)."""
    from persona_em.storage import check_writable

    cache = Path(cache_dir).resolve()
    for job in workflow.dag.needrun_jobs():
        if any(Path(str(f)).resolve().is_relative_to(cache) for f in job.output):
            check_writable(cache, "cache_dir")
            return
