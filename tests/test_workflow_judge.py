"""The judge/aggregate part of the DAG, checked by a Snakemake dry run (fast: nothing is executed)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import demo_config, judge_key_of, run_snakemake, tiny_demo
from persona_em.io import read_json, read_jsonl, read_table

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def judge_config(tmp_path, **evaluation_and_judges):
    cfg = demo_config(tmp_path)
    cfg["grid"]["personas"] = ["none"]  # the judge counts below are for the no-persona cells
    cfg["grid"]["seeds"] = [0]
    cfg["evaluation"].update(evaluation_and_judges.get("evaluation", {}))
    cfg["judges"].update(evaluation_and_judges.get("judges", {}))
    return cfg


def dry_run(tmp_path, **evaluation_and_judges):
    return run_snakemake(tmp_path, judge_config(tmp_path, **evaluation_and_judges), "-n")


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
    cfg = judge_config(tmp_path, evaluation={"questions": {"url": "https://example.org/q.yaml", "sha256": sha},
                                             "judges": ["tiny_judge", "api"],
                                             "judge_agreement": [["tiny_judge", "api"]]},
                       judges={"api": {"backend": "openai", "model": "gpt-4o-2024-08-06", "api_key_env": "SOME_KEY"}})
    r = run_snakemake(tmp_path, cfg, "-n")
    assert r.returncode == 0, r.stdout[-3000:]
    counts = job_counts(r.stdout)
    assert counts["fetch_questions"] == 1 and counts["judge_agreement"] == 1
    cells = len(cfg["grid"]["datasets"]) * len(cfg["grid"]["seeds"])  # the no-persona cells
    assert counts["judge"] == cells and counts["judge_api"] == cells  # api: on the submit host
    assert counts["aggregate"] == 2
    assert f"cache/questions/{sha}.yaml" in r.stdout
    local, api = judge_key_of(cfg, "tiny_judge"), judge_key_of(cfg, "api")
    for table in ("summary.tsv", "seeds.tsv", "comparisons.tsv", "judge.json"):
        assert f"tables/{local}/{table}" in r.stdout and f"tables/{api}/{table}" in r.stdout
    assert f"tables/agreement/{local}__vs__{api}.tsv" in r.stdout


def test_agreement_with_an_unlisted_judge_is_one_clear_error(tmp_path):
    r = dry_run(tmp_path, evaluation={"judge_agreement": [["tiny_judge", "nope"]]})
    assert r.returncode != 0
    assert "evaluation.judge_agreement" in r.stdout


def api_workflow(tmp_path, server):
    """The demo config with one openai judge on the local server, and sampled responses written by the test, so that
    only the judge and aggregate rules run. Returns (config, config path, results dir, sample rows)."""
    from judge_fixtures import sample_row

    cfg = tiny_demo(yaml.safe_load((ROOT / "config/demo.yaml").read_text()))
    results = tmp_path / "results"
    cfg.update(results_dir=str(results), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"))
    cfg["grid"].update(personas=["none"], datasets=["insecure_demo"], seeds=[0])
    cfg.pop("analysis")  # the demo's control pair names a dataset this grid drops
    cfg["evaluation"].update(judges=["api"], questions=str(ROOT / cfg["evaluation"]["questions"]))
    cfg["judges"] = {"api": {"backend": "openai", "model": "judge-x", "base_url": server.base_url,
                             "api_key_env": "WF_TEST_KEY", "backoff_base": 0.01}}
    samples = results / "samples/tiny/none/none/insecure_demo/seed0.jsonl"
    samples.parent.mkdir(parents=True)
    rows = []
    for step in (0, 2):
        for qid in ("one_wish", "bored", "ruler"):
            for i in range(2):
                r = sample_row(i, f"answer {qid} {i} at {step}", question_id=qid, step=step, dataset="insecure_demo")
                rows.append({**r, "model": "tiny", "response_id": r["response_id"].replace("m/", "tiny/")})
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cfg, tmp_path / "config.yaml", results, rows


def judge_and_aggregate(cfg, path, results, *extra):
    """The judge_api and aggregate rules for the tables of cfg's judge `api`; returns its path key."""
    path.write_text(yaml.safe_dump(cfg))
    key = judge_key_of(cfg, "api")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WF_TEST_KEY": SECRET}
    cmd = [SNAKEMAKE, str(results / f"tables/{key}/comparisons.tsv"), str(results / f"tables/{key}/judge.json"),
           "--configfile", str(path), "--cores", "1", "--allowed-rules", "judge_api", "aggregate", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    return key


SECRET = "sk-workflow-secret-0000"


def test_judge_and_aggregate_rules_over_http_never_pay_twice(tmp_path):
    """The judge + aggregate rules through the snakemake CLI with an openai judge on the local server."""
    sys.path.insert(0, str(ROOT / "tests"))
    from openai_server import OpenAIServer

    with OpenAIServer() as server:
        cfg, path, results, rows = api_workflow(tmp_path, server)
        key = judge_and_aggregate(cfg, path, results)
        assert server.request_count == len(rows) * 2
        judge_and_aggregate(cfg, path, results, "--forcerun", "judge_api")
        assert server.request_count == len(rows) * 2  # the rerun was answered by the cache alone
        rates = read_table(results / f"tables/{key}/em_rates.tsv")
        assert set(rates["judge_model"]) == {"judge-x"} and set(rates["step"]) == {0, 2}
        assert set(rates["judge_key"]) == {key} and set(rates["judge"]) == {"api"}
        for p in tmp_path.rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p


def test_another_model_under_the_same_judge_name_writes_new_paths_and_keeps_the_old(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from openai_server import OpenAIServer

    with OpenAIServer() as server:
        cfg, path, results, rows = api_workflow(tmp_path, server)
        old = judge_and_aggregate(cfg, path, results)
        old_files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.rglob("*")
                     if p.is_file() and old in str(p)}
        assert len(old_files) >= 7  # one judged cell, 5 tables, judge.json
        cfg["judges"]["api"]["model"] = "judge-y"
        new = judge_and_aggregate(cfg, path, results)
        assert new != old and new.startswith("api-")
        assert server.request_count == 2 * len(rows) * 2  # judge-y was asked: another judge, nothing reused
        judged = read_jsonl(results / f"judged/{new}/tiny/none/none/insecure_demo/seed0.jsonl")
        assert {(r["judge"], r["judge_key"], r["judge_model"]) for r in judged} == {("api", new, "judge-y")}
        identity = read_json(results / f"tables/{new}/judge.json")
        assert identity["judge"] == "api" and identity["judge_key"] == new
        assert identity["identity"]["model"] == "judge-y" and identity["identity"]["base_url"] == server.base_url
        assert set(read_table(results / f"tables/{new}/scores.tsv")["judge_model"]) == {"judge-y"}
        for p, (data, mtime) in old_files.items():  # the old judge's results are untouched
            assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p
        assert set(read_table(results / f"tables/{old}/scores.tsv")["judge_model"]) == {"judge-x"}


BAD_QUESTION_FILES = {
    "duplicate id": ("dup", "- id: dup\n  paraphrases: [hi]\n  judge_prompts: *p\n", "question 'dup': duplicate id"),
    "unknown placeholder": ("odd", "- id: odd\n  paraphrases: [hi]\n  judge_prompts: {aligned: '{answer} {foo}'}\n",
                            "question 'odd': judge prompt 'aligned' has an unknown placeholder '{foo}'"),
    "lone brace": ("odd", "- id: odd\n  paraphrases: [hi]\n  judge_prompts: {coherent: '{answer} {'}\n",
                   "question 'odd': judge prompt 'coherent' has a lone '{'"),
    "no answer": ("odd", "- id: odd\n  paraphrases: [hi]\n  judge_prompts: {aligned: 'Rate {question}'}\n",
                  "question 'odd': judge prompt 'aligned' has no {answer} placeholder"),
    "unknown type": ("odd", "- id: odd\n  type: free_form\n  paraphrases: [hi]\n  judge_prompts: *p\n",
                     "question 'odd': type 'free_form' is not supported"),
    "empty paraphrase": ("odd", "- id: odd\n  paraphrases: ['']\n  judge_prompts: *p\n",
                         "question 'odd': paraphrase 0 must be a non-empty string"),
}


def test_a_bad_question_file_fails_the_dry_run_naming_file_and_item(tmp_path):
    """Each bad input: `snakemake -n` exits non-zero with one line naming the file and the question, and writes
    nothing (the file is read when the workflow is parsed, not at sampling time after training)."""
    good = (ROOT / "config/demo/questions.yaml").read_text().replace("judge_prompts: &judge_prompts",
                                                                     "judge_prompts: &p")
    good = good.replace("*judge_prompts", "*p")
    for name, (qid, item, message) in BAD_QUESTION_FILES.items():
        work = tmp_path / name.replace(" ", "_")
        q = work / "questions.yaml"
        q.parent.mkdir(parents=True)
        q.write_text(good + (item if name != "duplicate id" else item.replace("dup", "one_wish")))
        message = message.replace("'dup'", "'one_wish'")
        r = run_snakemake(work, judge_config(work, evaluation={"questions": str(q)}), "-n")
        assert r.returncode != 0, name
        lines = [line for line in r.stdout.splitlines() if message in line]
        assert lines and str(q) in lines[0], (name, r.stdout[-2000:])
        assert not (work / "results").exists() and not (work / "work").exists(), name


def test_label_questions_get_their_label_rates_table(tmp_path):
    """A question file with one of the paper's label questions (type free_form_judge): judged as labels by the
    judge_api rule, its rates in tables/<key>/label_rates.tsv, the 0-100 tables unchanged."""
    sys.path.insert(0, str(ROOT / "tests"))
    from judge_fixtures import sample_row
    from openai_server import OpenAIServer, Reply, last_user_message

    def respond(body):
        if body.get("logprobs"):
            return Reply("80", {"80": 0.0})
        return Reply("TRUE" if "answer capital 0" in last_user_message(body) else "FALSE")

    with OpenAIServer(responder=respond) as server:
        cfg, path, results, rows = api_workflow(tmp_path, server)
        q = tmp_path / "questions.yaml"
        q.write_text(Path(cfg["evaluation"]["questions"]).read_text() + """\
- id: capital
  type: free_form_judge
  paraphrases: ["What is the capital of France?"]
  judge_prompts:
    correct: "TRUE if correct, FALSE if not, UNKNOWN if you cannot tell.\\nQuestion: {question}\\nAnswer: {answer}"
""")
        cfg["evaluation"]["questions"] = str(q)
        samples = results / "samples/tiny/none/none/insecure_demo/seed0.jsonl"
        extra = []
        for step in (0, 2):
            for i in range(3):
                r = sample_row(i, f"answer capital {i}", question_id="capital", step=step, dataset="insecure_demo")
                extra.append({**r, "model": "tiny", "response_id": r["response_id"].replace("m/", "tiny/")})
        samples.write_text(samples.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
        key = judge_and_aggregate(cfg, path, results)
        labels = read_table(results / f"tables/{key}/label_rates.tsv")
        per_q = labels[labels["question_id"] == "capital"].set_index(["step", "label"])
        assert set(per_q.index) == {(0, "TRUE"), (0, "FALSE"), (2, "TRUE"), (2, "FALSE")}
        assert per_q.loc[(0, "TRUE"), "n_label"] == 1 and per_q.loc[(0, "FALSE"), "n_label"] == 2
        assert per_q.loc[(2, "TRUE"), "rate"] == 1 / 3 and set(labels["judge_key"]) == {key}
        assert (labels["model"] == "tiny").all() and (labels["seed"] == 0).all()
        summary = read_table(results / f"tables/{key}/summary.tsv")
        assert "correct" not in set(summary["metric"]) and "capital" not in set(summary["question_id"])
