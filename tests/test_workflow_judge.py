"""The judge/aggregate part of the DAG, checked by a Snakemake dry run (fast: nothing is executed)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def dry_run(tmp_path, **evaluation_and_judges):
    cfg = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["work_dir"] = str(tmp_path / "work")
    cfg["cache_dir"] = str(tmp_path / "cache")
    cfg["evaluation"].update(evaluation_and_judges.get("evaluation", {}))
    cfg["judges"].update(evaluation_and_judges.get("judges", {}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([SNAKEMAKE, "-n", "--configfile", str(path), "--cores", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True)


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
    assert r.returncode == 0, r.stderr + r.stdout
    counts = job_counts(r.stdout)
    assert counts["fetch_questions"] == 1 and counts["judge_agreement"] == 1
    assert counts["judge"] == 8 and counts["aggregate"] == 2
    assert f"cache/questions/{sha}.yaml" in r.stdout
    for table in ("summary.tsv", "seeds.tsv", "comparisons.tsv", "agreement/tiny_judge__vs__api.tsv"):
        assert table in r.stdout


def test_agreement_with_an_unlisted_judge_is_one_clear_error(tmp_path):
    r = dry_run(tmp_path, evaluation={"judge_agreement": [["tiny_judge", "nope"]]})
    assert r.returncode != 0
    assert "evaluation.judge_agreement" in r.stdout + r.stderr
