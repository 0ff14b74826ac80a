"""The Leonardo profile against the workflow's rules, the controller's checks, and the compute-job environment."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from persona_em import cluster
from persona_em.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PROFILE = yaml.safe_load((REPO / "profiles/leonardo/config.yaml").read_text())


@pytest.fixture(scope="module")
def workflow():
    """The parsed workflow (demo config), through Snakemake's API."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with SnakemakeApi() as api:
            wf = api.workflow(resource_settings=ResourceSettings(),
                              config_settings=ConfigSettings(configfiles=[REPO / "config/demo.yaml"]),
                              snakefile=REPO / "Snakefile", workdir=REPO)._workflow
            yield SimpleNamespace(rules=list(wf.rules), _localrules=set(wf._localrules))
    finally:
        os.chdir(cwd)


def slurm_workflow(workflow, set_resources, default_resources=None, no_account=False):
    return SimpleNamespace(
        executor_plugin=SimpleNamespace(name="slurm"), rules=workflow.rules, _localrules=workflow._localrules,
        resource_settings=SimpleNamespace(default_resources=default_resources or {"slurm_account": "acct"},
                                          overwrite_resources=set_resources),
        executor_settings=SimpleNamespace(no_account=no_account))


def test_every_submitted_rule_has_a_resources_mapping(workflow):
    assert cluster.unmapped_rules(workflow.rules, workflow._localrules, PROFILE["set-resources"]) == []
    submitted = {r.name for r in workflow.rules if not r.norun and r.name not in workflow._localrules}
    assert {"train_em", "sample", "judge", "gpu_check"} <= submitted
    assert {"prepare_model", "fetch_dataset"} <= workflow._localrules  # downloads stay on the login side


def test_rule_without_mapping_is_one_clear_error(workflow):
    resources = {k: v for k, v in PROFILE["set-resources"].items() if k != "sample"}
    with pytest.raises(UserError, match=r"without a resources mapping.*: sample \(add them to profiles/leonardo"):
        cluster.check_submission(slurm_workflow(workflow, resources))


def test_gpu_rules_request_gpus_cpus_memory_and_capped_runtime():
    res = PROFILE["set-resources"]
    for rule, gpus in {"train_em": 1, "sample": 1, "judge": 1, "train_dpo": 1, "student": 1, "teacher": 4}.items():
        assert res[rule]["gres"] == f"gpu:{gpus}" and res[rule]["cpus_per_task"] == 8 * gpus
        assert res[rule]["mem_mb"] == 120_000 * gpus and res[rule]["slurm_partition"] == "boost_usr_prod"
        runtimes = [eval(res[rule]["runtime"], {"attempt": a}) for a in (1, 2, 3, 10)]
        assert runtimes == sorted(runtimes) and runtimes[0] < runtimes[1] and max(runtimes) == 24 * 60
    for rule in ("aggregate", "summary_tables", "plot_figures", "make_demo_dataset", "prepare_dataset"):
        assert res[rule]["slurm_partition"] == "lrd_all_serial" and "gres" not in res[rule]
        assert max(eval(res[rule]["runtime"], {"attempt": a}) for a in range(1, 10)) <= 240
    four = {k: eval(str(v), {"wildcards": SimpleNamespace(gpus="4")}) for k, v in res["gpu_check"].items()
            if k in ("gres", "cpus_per_task", "mem_mb")}
    assert four == {"gres": "gpu:4", "cpus_per_task": 32, "mem_mb": 480_000}
    assert PROFILE["jobs"] < 10 and PROFILE["retries"] >= 1  # MaxSubmitPU=10
    assert PROFILE["groups"] == {"make_demo_dataset": "data", "prepare_dataset": "data", "aggregate": "report",
                                 "summary_tables": "report", "plot_figures": "report", "report_pages": "report"}
    assert PROFILE["slurm-logdir"] == "logs/slurm" and PROFILE["slurm-efficiency-report"] is True
    assert PROFILE["default-resources"]["slurm_account"] == "$PERSONA_EM_ACCOUNT"  # never hard-coded


def test_no_account_is_one_clear_error(workflow, monkeypatch):
    monkeypatch.delenv(cluster.ACCOUNT_ENV, raising=False)
    wf = slurm_workflow(workflow, PROFILE["set-resources"], PROFILE["default-resources"])
    with pytest.raises(UserError, match=r"^no SLURM account set: export PERSONA_EM_ACCOUNT="):
        cluster.check_submission(wf)
    monkeypatch.setenv(cluster.ACCOUNT_ENV, "IscrC_test")
    cluster.check_submission(wf)
    monkeypatch.delenv(cluster.ACCOUNT_ENV)
    cluster.check_submission(slurm_workflow(workflow, PROFILE["set-resources"], {}, no_account=True))


def test_checks_only_apply_to_slurm(workflow):
    cluster.check_submission(SimpleNamespace(executor_plugin=SimpleNamespace(name="local")))
    cluster.check_submission(SimpleNamespace(executor_plugin=None))


def test_compute_job_env_is_offline_with_hf_home_in_the_cache(tmp_path):
    env = cluster.compute_job_env(str(tmp_path / "cache"))
    assert env == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "HF_HOME": str((tmp_path / "cache/huggingface").resolve())}


def test_compute_job_missing_model_names_it(tmp_path, monkeypatch):
    from persona_em.io import write_json
    from persona_em.models import model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = tmp_path / "model.json"
    write_json(manifest, {"model": "qwen7b", "path": str(tmp_path / "cache/models/Qwen--Qwen2.5-7B/abc")})
    with pytest.raises(UserError, match=r"model 'qwen7b' .* is missing: .*/abc/config.json \(this compute node has "
                                        r"no network\)"):
        model_dir(str(manifest))


def test_gpu_smoke_counts_visible_gpus(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("counts CUDA_VISIBLE_DEVICES only where there is no CUDA runtime")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cluster.gpu_smoke(2, str(tmp_path / "ok.json"))
    assert (tmp_path / "ok.json").exists()
    with pytest.raises(UserError, match=r"asked for 4 GPU\(s\) but sees 2"):
        cluster.gpu_smoke(4, str(tmp_path / "bad.json"))
    assert not (tmp_path / "bad.json").exists()
