"""The demo DAG on a real single-node SLURM cluster, through `--profile profiles/leonardo`.

The training job is forced into a TIMEOUT (1-minute limit, training slowed by the `slow_down_seconds` knob); the
retry is resubmitted with a longer runtime, resumes from the trainer checkpoint in work_dir, and every result
equals a local run's. Needs root (CI runs as root) to install and start slurmctld/slurmd/munge.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402
from conftest import judge_key_of, tiny_demo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
pytestmark = pytest.mark.slow


def reduced_demo(root: Path, **training) -> Path:
    """The demo config cut to one cell (1 dataset, 1 seed) and few samples, writing under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_demo(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    cfg.update(results_dir=str(root / "results"), work_dir=str(root / "work"), cache_dir=str(root / "cache"))
    cfg["grid"].update(personas=["none"], datasets=["insecure_demo"], seeds=[0])  # one cell: no persona arm
    cfg["datasets"] = {"insecure_demo": cfg["datasets"]["insecure_demo"]}
    cfg.pop("analysis")  # the demo's control pair names a dataset this grid drops
    cfg["datasets"]["insecure_demo"]["demo"]["n_rows"] = 48  # 42 training rows, batch 8: 6 optimizer steps
    cfg["sampling"]["n_samples"] = 2
    cfg["checkpoints"] = {"steps": [0, 2, "final"]}
    cfg["training"].update(effective_batch_size=8, per_device_batch_size=4, resume_every_steps=1,  # a trainer
                           **training)                                   # checkpoint after every step
    cfg["evaluation"]["questions"] = str(REPO / cfg["evaluation"]["questions"])
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cluster_overrides(root: Path, train_runtime: str) -> Path:
    """Workflow profile layered over profiles/leonardo: only what a test cluster needs changed."""
    leonardo = yaml.safe_load((REPO / "profiles/leonardo/config.yaml").read_text())
    resources = leonardo["set-resources"]
    resources["train_em"]["runtime"] = train_runtime
    override = {
        "slurm-no-account": True,              # no accounting database on the test cluster
        "default-resources": {"mem_mb": 1000},  # replaces the account default (PERSONA_EM_ACCOUNT)
        "slurm-status-command": "squeue",      # sacct needs accounting storage
        "slurm-init-seconds-before-status-checks": 5,
        "slurm-efficiency-report": False,      # needs sacct
        "slurm-logdir": str(root / "logs/slurm"),
        "set-resources": resources,
    }
    path = root / "override"
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(override))
    return path


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def adapters(results: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((results / "em").rglob("adapter_model.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.relative_to(results)}:{k}"] = v
    return out


def rows(path: Path, drop=("fingerprint",)) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(f"real SLURM test skipped: {reason}")
    try:
        slurm_cluster.install()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"real SLURM test skipped: cannot install {slurm_cluster.PACKAGES} ({e})")
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_demo_on_slurm_timeout_retry_resumes(cluster, tmp_path):
    t0 = time.time()
    ref_cfg = reduced_demo(tmp_path / "local")
    local = subprocess.run([SNAKEMAKE, "--profile", "profiles/local", "--configfile", str(ref_cfg), "--cores", "2"],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    t_local = time.time() - t0

    # 6 optimizer steps x 20 s: the 1-minute limit (enforced within ~30 s) ends attempt 1 mid-training, after a
    # checkpoint (one per step; the SIGTERM SLURM sends at the limit also checkpoints the step in flight).
    slurm_root = tmp_path / "slurm"
    cfg = reduced_demo(slurm_root, slow_down_seconds=20.0)
    override = cluster_overrides(slurm_root, "min(attempt ** 2, 30)")  # 1 min, then 4 min
    run = subprocess.run(
        [SNAKEMAKE, "all", "gpu_smoke", "--profile", "profiles/leonardo", "--workflow-profile", str(override),
         "--configfile", str(cfg)],
        cwd=REPO, env=env(**cluster.env), capture_output=True, text=True, timeout=1200)
    jobs = cluster.jobs()
    assert run.returncode == 0, run.stderr[-6000:] + "\n" + json.dumps(jobs, indent=1)
    t_slurm = time.time() - t0 - t_local
    print(f"local run {t_local:.0f} s, SLURM run {t_slurm:.0f} s, {len(jobs)} SLURM jobs")

    # Every compute rule went through sbatch (the localrule prepare_model did not); the profile's groups ran
    # make_demo_dataset + prepare_dataset as one job ("data"), the tables and figures as another ("report").
    rules = [j["comment"].split("_wildcards_")[0].removeprefix("rule_") for j in jobs]
    # (a group job's comment is rule_<group>_<its rules>)
    report = [r for r in rules if r.startswith("report_")]
    assert len(report) == 1 and all(r in report[0] for r in ("aggregate", "summary_tables", "plot_figures",
                                                                "report_pages")), rules
    assert sorted(set(rules) - set(report)) == ["data_make_demo_dataset_prepare_dataset", "gpu_check", "judge",
                                                "sample", "train_em", "weight_norms"], rules
    assert len(jobs) == 9, jobs  # 2 gpu_check, data, 2 train_em attempts, weight_norms, sample, judge, report
    assert all(j["name"].startswith("persona_em_") for j in jobs)

    # The training job timed out with a 1-minute limit; the retry ran with a longer one and finished.
    train = [j for j in jobs if j["comment"].startswith("rule_train_em")]
    assert [j["state"] for j in train] == ["TIMEOUT", "COMPLETED"], train
    assert [j["time_limit"] for j in train] == ["1:00", "4:00"], train
    assert all(j["partition"] == "boost_usr_prod" and "gpu:1" in j["gres"] for j in train), train
    train_log = next((slurm_root / "results/logs/train_em").rglob("*.log")).read_text()  # the retry's log
    resumed = [int(l.split("resumed from step ")[1].split()[0]) for l in train_log.splitlines()
               if "resumed from step" in l]
    assert resumed and 0 < resumed[0] < 6, train_log[-3000:]  # the retry trained the remaining steps

    # Same results as the uninterrupted local run.
    ref, got = adapters(tmp_path / "local/results"), adapters(slurm_root / "results")
    assert ref.keys() == got.keys() and ref
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6
    cell = "tiny/none/none/insecure_demo/seed0.jsonl"
    assert rows(slurm_root / "results/samples" / cell) == rows(tmp_path / "local/results/samples" / cell)
    key = judge_key_of(yaml.safe_load(cfg.read_text()), "tiny_judge")
    assert key == judge_key_of(yaml.safe_load(ref_cfg.read_text()), "tiny_judge")  # training speed is no judge's
    judged = f"judged/{key}/{cell}"
    assert rows(slurm_root / "results" / judged) == rows(tmp_path / "local/results" / judged)
    for table in ("scores.tsv", "em_rates.tsv"):
        assert ((slurm_root / f"results/tables/{key}" / table).read_text()
                == (tmp_path / f"local/results/tables/{key}" / table).read_text())

    # Compute jobs ran offline with HF_HOME in the cache dir, and saw the GPUs they asked for.
    for n in (1, 4):
        smoke = json.loads((slurm_root / f"results/gpu_smoke/gpus{n}.json").read_text())
        assert smoke["seen"] == n and smoke["SLURM_JOB_ID"]
        assert smoke["HF_HUB_OFFLINE"] == smoke["TRANSFORMERS_OFFLINE"] == smoke["HF_DATASETS_OFFLINE"] == "1"
        assert smoke["WANDB_MODE"] == "offline"
        assert smoke["HF_HOME"] == str((slurm_root / "cache/huggingface").resolve())
    assert list((slurm_root / "logs/slurm").rglob("*.log")), "SLURM logs under the profile's logdir"


def run_expecting_refusal(cluster, root: Path, override: Path, env_extra: dict, needle: str) -> str:
    before = len(cluster.jobs())
    cfg = reduced_demo(root)
    run = subprocess.run([SNAKEMAKE, "all", "--profile", "profiles/leonardo", "--workflow-profile", str(override),
                          "--configfile", str(cfg)],
                         cwd=REPO, env={**env(**cluster.env), **env_extra}, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    hits = [l for l in run.stderr.splitlines() if needle in l]
    assert len(hits) == 1, run.stderr[-4000:]
    assert len(cluster.jobs()) == before, "nothing may be submitted"
    return hits[0]


def test_no_account_is_refused_before_submitting(cluster, tmp_path):
    override = cluster_overrides(tmp_path, "min(attempt ** 2, 30)")
    spec = yaml.safe_load((override / "config.yaml").read_text())
    del spec["slurm-no-account"], spec["default-resources"]  # back to the profile's $PERSONA_EM_ACCOUNT
    (override / "config.yaml").write_text(yaml.safe_dump(spec))
    line = run_expecting_refusal(cluster, tmp_path, override, {"PERSONA_EM_ACCOUNT": ""}, "no SLURM account set")
    assert line.startswith("no SLURM account set: export PERSONA_EM_ACCOUNT=")


def test_rule_without_resources_is_refused_before_submitting(cluster, tmp_path):
    override = cluster_overrides(tmp_path, "min(attempt ** 2, 30)")
    spec = yaml.safe_load((override / "config.yaml").read_text())
    del spec["set-resources"]["sample"]
    (override / "config.yaml").write_text(yaml.safe_dump(spec))
    line = run_expecting_refusal(cluster, tmp_path, override, {}, "without a resources mapping")
    assert "without a resources mapping in the profile's set-resources: sample (add them" in line


def test_a_failing_group_member_removes_its_finished_siblings_output(cluster, tmp_path):
    """Why `sample` and `collect_activations` are not one Snakemake group (rules/activations.smk): with the slurm
    plugin, the group is one sbatch job with the right resources (runtimes summed, one GPU), but when the second
    job fails, the first one's finished output is removed too. Two stand-in rules with the profile's resources of
    the two; if Snakemake ever keeps the sibling's output, grouping them becomes safe and this test says so."""
    res = yaml.safe_load((REPO / "profiles/leonardo/config.yaml").read_text())["set-resources"]

    def resources(rule):
        r = {k: v for k, v in res[rule].items() if k != "runtime"}
        return {**r, "runtime": eval(res[rule]["runtime"], {"min": min}, {"attempt": 1})}

    (tmp_path / "Snakefile").write_text(f"""
rule all:
    input: "activations.txt"

rule sample:
    output: "samples.txt"
    group: "cell"
    resources: **{resources("sample")!r}
    shell: "echo sampled > {{output}}"

rule collect_activations:
    input: "samples.txt"
    output: "activations.txt"
    group: "cell"
    resources: **{resources("collect_activations")!r}
    shell: "test -s {{input}} && exit 1"
""")
    run = subprocess.run([SNAKEMAKE, "--executor", "slurm", "--jobs", "1", "--slurm-no-account",
                          "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
                          "--default-resources", "mem_mb=1000", "--latency-wait", "5", "--keep-going"],
                         cwd=tmp_path, env=env(**cluster.env), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    job = [j for j in cluster.jobs() if j["comment"] == "rule_cell_collect_activations_sample"]
    assert len(job) == 1 and job[0]["state"] == "FAILED", cluster.jobs()
    runtime = resources("sample")["runtime"] + resources("collect_activations")["runtime"]
    assert job[0]["time_limit"] == f"{runtime // 60}:{runtime % 60:02d}:00" and job[0]["gres"] == "gres:gpu:1", job
    log = next((tmp_path / ".snakemake/slurm_logs").rglob("*.log")).read_text()
    assert "Finished jobid" in log and "(Rule: sample)" in log, log[-3000:]  # sample did finish ...
    assert not (tmp_path / "samples.txt").exists()  # ... and its output was removed with the failed group
