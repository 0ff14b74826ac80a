import json

import pytest

from persona_em.data import load_chat_jsonl, prepare_dataset
from persona_em.errors import UserError
from persona_em.io import sha256_file


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]})


def _prepare(src, tmp_path, sha=None, eval_fraction=0.25, seed=0):
    out = tmp_path / "out"
    return prepare_dataset(src, "ds", sha, eval_fraction, seed, out / "train.jsonl", out / "eval.jsonl",
                           out / "manifest.json"), out


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"messages": [', "line 2: malformed JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 2: the conversation does not end with an assistant turn"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "line 2: messages\\[0\\] must be"),
        (json.dumps({"text": "no messages"}), "line 2: expected an object with a non-empty 'messages' list"),
    ],
)
def test_bad_rows_fail_naming_file_and_line_and_write_nothing(tmp_path, bad_line, message):
    src = _write(tmp_path / "data.jsonl", [GOOD, bad_line, GOOD])
    with pytest.raises(UserError, match=message) as err:
        _prepare(src, tmp_path)
    assert str(src) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_chat_jsonl(tmp_path / "nope.jsonl")


def test_sha256_mismatch_is_a_user_error(tmp_path):
    src = _write(tmp_path / "data.jsonl", [GOOD] * 4)
    with pytest.raises(UserError, match="sha256"):
        _prepare(src, tmp_path, sha="0" * 64)
    manifest, _ = _prepare(src, tmp_path, sha=sha256_file(src))
    assert manifest["sha256"] == sha256_file(src)


def test_split_is_seeded_and_recorded(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a."}]})
             for i in range(20)]
    src = _write(tmp_path / "data.jsonl", lines)
    m1, out = _prepare(src, tmp_path, seed=3)
    first = (out / "eval.jsonl").read_text()
    m2, out = _prepare(src, tmp_path, seed=3)
    assert (out / "eval.jsonl").read_text() == first
    assert m1["eval_source_indices"] == m2["eval_source_indices"] and len(m1["eval_source_indices"]) == 5
    assert m1["n_train"] == 15 and m1["split_seed"] == 3
    m3, _ = _prepare(src, tmp_path, seed=4)
    assert m3["eval_source_indices"] != m1["eval_source_indices"]
