"""The judge/aggregate part of the DAG, checked by a Snakemake dry run (fast: nothing is executed)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import demo_config, run_snakemake

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def dry_run(tmp_path, **evaluation_and_judges):
    cfg = demo_config(tmp_path)
    cfg["grid"]["personas"] = ["none"]  # the judge counts below are for the no-persona cells
    cfg["evaluation"].update(evaluation_and_judges.get("evaluation", {}))
    cfg["judges"].update(evaluation_and_judges.get("judges", {}))
    return run_snakemake(tmp_path, cfg, "-n")


def job_counts(stdout: str) -> dict:
    counts, on = {}, False
    for line in stdout.splitlines():
        if line.startswith("job ") and "count" in line:
            on = True
            continue
        if on and line.strip() and not line.startswith("-"):
            parts = line.split()
            if parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
    return counts


def test_url_questions_are_fetched_and_agreement_and_new_tables_are_targets(tmp_path):
    sha = hashlib.sha256(b"canonical question file").hexdigest()
    r = dry_run(tmp_path, evaluation={"questions": {"url": "https://example.org/q.yaml", "sha256": sha},
                                      "judges": ["tiny_judge", "api"], "judge_agreement": [["tiny_judge", "api"]]},
                judges={"api": {"backend": "openai", "model": "gpt-4o-2024-08-06", "api_key_env": "SOME_KEY"}})
    assert r.returncode == 0, r.stdout[-3000:]
    counts = job_counts(r.stdout)
    assert counts["fetch_questions"] == 1 and counts["judge_agreement"] == 1
    assert counts["judge"] == 4 and counts["judge_api"] == 4 and counts["aggregate"] == 2  # api: on the submit host
    assert f"cache/questions/{sha}.yaml" in r.stdout
    for table in ("summary.tsv", "seeds.tsv", "comparisons.tsv", "agreement/tiny_judge__vs__api.tsv"):
        assert table in r.stdout


def test_agreement_with_an_unlisted_judge_is_one_clear_error(tmp_path):
    r = dry_run(tmp_path, evaluation={"judge_agreement": [["tiny_judge", "nope"]]})
    assert r.returncode != 0
    assert "evaluation.judge_agreement" in r.stdout


def test_judge_and_aggregate_rules_over_http_never_pay_twice(tmp_path):
    """The judge + aggregate rules through the snakemake CLI with an openai judge on the local server; the sampled
    responses are written by the test, so only these two rules run."""
    sys.path.insert(0, str(ROOT / "tests"))
    from judge_fixtures import sample_row
    from openai_server import OpenAIServer

    secret = "sk-workflow-secret-0000"
    with OpenAIServer() as server:
        cfg = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
        results = tmp_path / "results"
        cfg.update(results_dir=str(results), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"))
        cfg["grid"].update(personas=["none"], datasets=["insecure_demo"], seeds=[0])
        cfg["evaluation"].update(judges=["api"])
        cfg["judges"] = {"api": {"backend": "openai", "model": "judge-x", "base_url": server.base_url,
                                 "api_key_env": "WF_TEST_KEY", "backoff_base": 0.01}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        samples = results / "samples/tiny/none/none/insecure_demo/seed0.jsonl"
        samples.parent.mkdir(parents=True)
        rows = []
        for step in (0, 2):
            for qid in ("one_wish", "bored", "ruler"):
                for i in range(2):
                    r = sample_row(i, f"answer {qid} {i} at {step}", question_id=qid, step=step,
                                   dataset="insecure_demo")
                    rows.append({**r, "model": "tiny", "response_id": r["response_id"].replace("m/", "tiny/")})
        samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WF_TEST_KEY": secret}
        target = str(results / "tables/api/comparisons.tsv")
        cmd = [SNAKEMAKE, target, "--configfile", str(path), "--cores", "1", "--allowed-rules",
               "judge_api", "aggregate"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
        assert server.request_count == len(rows) * 2
        r = subprocess.run(cmd + ["--forcerun", "judge_api"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert server.request_count == len(rows) * 2  # the rerun was answered by the cache alone
        from persona_em.io import read_table
        rates = read_table(results / "tables/api/em_rates.tsv")
        assert set(rates["judge_model"]) == {"judge-x"} and set(rates["step"]) == {0, 2}
        for p in tmp_path.rglob("*"):
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p
