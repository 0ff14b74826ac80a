"""Who a judge is: its settings' defaults, the identity columns of every judged row, and its path key."""
from __future__ import annotations

from pathlib import Path

from persona_em.config import model_source
from persona_em.errors import UserError
from persona_em.io import sha256_file, stable_hash
from persona_em.judging.scoring import DEFAULT_MIN_NUMERIC_MASS

# The judge settings and their defaults (the same as in config/schemas/config.schema.yaml; a test checks that).
JUDGE_DEFAULTS = {
    "mode": "logprobs",
    "api_key_env": "OPENAI_API_KEY",
    "min_numeric_mass": DEFAULT_MIN_NUMERIC_MASS,
    "timeout": 60,
    "max_retries": 6,
    "backoff_base": 1.0,
    "backoff_max": 60.0,
    "concurrency": 16,
    "max_answer_chars": 20000,
    "text_max_tokens": 16,
}


# The identity columns of every judged row and table row (judge_identity); the aggregation never pools two.
JUDGE_COLUMNS = ["judge", "judge_key", "judge_model", "judge_mode", "judge_prompt_hash"]


def judge_identity(name: str, cfg: dict, questions, key: str | None = None) -> dict:
    """The JUDGE_COLUMNS of every judged row: name, path key (see judge_key), model, mode, prompt templates."""
    templates = {q.id: q.judge_prompts for q in questions}
    return {"judge": name, "judge_key": key or name, "judge_model": cfg["model"],
            "judge_mode": cfg.get("mode", "logprobs"), "judge_prompt_hash": stable_hash(templates)}


# --- the judge's path key ------------------------------------------------------------------------------------------
# A judge's results live under its path key, `<name>-<8 hex>`, never under its name alone: editing what a name means
# (another model, endpoint, mode, question file) moves the results to a new path and leaves the old ones untouched.
# The hash covers what decides the judge's answers and the scores written to its judged rows:
#   backend, model, mode; base_url (openai: endpoints serving the same model name can differ); the model's entry
#   under `models:` (hf; without size_b, a label); min_numeric_mass and max_answer_chars (they change scores and what
#   the judge sees); text_max_tokens in text mode (the answer's length; logprobs asks for one token); the sha256 of
#   the question file (it holds the judge prompt templates and the question types). A label question's answer
#   length is the code constant LABEL_MAX_TOKENS, not a setting.
# Left out, so changing them never moves results: how the judge is called (api_key_env, timeout, max_retries,
# backoff_base, backoff_max, concurrency, azure_api_version: the API version, not the deployment) and what it costs
# (prices, budget_usd). Also left out: evaluation.score_policy (what CODE / REFUSAL / null mean per metric). The
# judged rows keep the raw score and status; the policy is applied by the aggregate rule, to every judge alike, is
# recorded in each table row (score_policy), and a changed policy reruns the aggregate rule in place (it is a param).
KEY_SETTINGS = ("backend", "model", "mode", "min_numeric_mass", "max_answer_chars")


def questions_sha256(config: dict) -> str:
    """sha256 of the question file: the configured digest of a {url, sha256} source, else the local file's bytes."""
    source = config["evaluation"]["questions"]
    if isinstance(source, dict):
        return source["sha256"].lower()
    if not Path(source).is_file():
        raise UserError(f"config evaluation.questions: {source}: question file not found (each judge's path key "
                        f"hashes it: put the file there, or give {{url, sha256}} of a canonical copy)")
    return sha256_file(source)


def judge_key_identity(config: dict, name: str, questions_sha: str | None = None) -> dict:
    """What judge `name`'s path key hashes (defaults filled in, so spelling a default out changes nothing)."""
    cfg = {**JUDGE_DEFAULTS, **config["judges"][name]}
    identity = {k: cfg.get(k) for k in KEY_SETTINGS}
    if cfg["backend"] == "openai":
        identity["base_url"] = cfg.get("base_url")
    else:
        identity["model_source"] = model_source(config, cfg["model"])
    if cfg["mode"] == "text":
        identity["text_max_tokens"] = cfg["text_max_tokens"]
    identity["questions_sha256"] = questions_sha or questions_sha256(config)
    return identity


def judge_key(config: dict, name: str, questions_sha: str | None = None) -> str:
    """The judge's path key: `<name>-<first 8 hex of the hash of judge_key_identity>`. Pass `questions_sha`
    (questions_sha256(config)) when computing many keys, to read the question file once."""
    return f"{name}-{stable_hash(judge_key_identity(config, name, questions_sha), 8)}"

