import gzip
import json

import pytest

from persona_em.data.datasets import load_chat_jsonl, prepare_dataset
from persona_em.errors import UserError
from persona_em.io import sha256_file, write_jsonl


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


# --- gzip-compressed datasets (.jsonl.gz, the Model Organisms for EM layout) and bytes that are not chat JSONL ---

def _gzip(path, lines):
    path.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode()))
    return path


def test_gzip_dataset_loads_like_its_plain_copy(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i} é"}, {"role": "assistant", "content": "a."}]})
             for i in range(8)]
    plain = _write(tmp_path / "data.jsonl", lines)
    assert load_chat_jsonl(_gzip(tmp_path / "data.jsonl.gz", lines)) == load_chat_jsonl(plain)
    # detected by its magic bytes, not its name: a URL-fetched dataset is stored as .jsonl whatever it was
    fetched = _gzip(tmp_path / "fetched.jsonl", lines)
    manifest, out = _prepare(fetched, tmp_path, sha=sha256_file(fetched))
    assert manifest["n_rows"] == 8 and manifest["sha256"] == sha256_file(fetched)  # the stored (compressed) bytes
    assert len(load_chat_jsonl(out / "train.jsonl")) == 6  # prepared splits are plain JSONL


def _raw(path, blob: bytes):
    path.write_bytes(blob)
    return path


def _truncated(path):
    lines = [GOOD] * 2000
    blob = gzip.compress("".join(line + "\n" for line in lines).encode())
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _corrupt(path):
    blob = bytearray(gzip.compress("".join(line + "\n" for line in [GOOD] * 50).encode()))
    blob[-8] ^= 0xFF  # the CRC of the data
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _write(p.with_name("data.jsonl.gz"), [GOOD]), r"data.jsonl.gz: named .gz but is not gzip"),
        (lambda p: _truncated(p.with_name("data.jsonl.gz")), r"data.jsonl.gz: line \d+: cannot read the gzip data"),
        (lambda p: _truncated(p), r"data.jsonl: line \d+: cannot read the gzip data .*truncated"),
        (lambda p: _corrupt(p.with_name("data.jsonl.gz")), r"data.jsonl.gz: line 51: cannot read the gzip data"),
        (lambda p: _gzip(p.with_name("data.jsonl.gz"), [GOOD, "not json", GOOD]), r"data.jsonl.gz: line 2: malformed JSON"),
        (lambda p: _raw(p, (GOOD + "\n").encode() + b'{"messages": "\xff\xfe"}\n'),
         r"data.jsonl: line 2: not UTF-8 text \(byte 0xff at column 15\)"),
        (lambda p: _raw(p.with_name("data.jsonl.gz"), gzip.compress((GOOD + "\n").encode() + b"\xc3\x28\n")),
         r"data.jsonl.gz: line 2: not UTF-8 text"),
        (lambda p: _raw(p, b"PK\x03\x04rest of a zip"), r"data.jsonl: is a zip archive"),
    ],
    ids=["gz-not-gzip", "gz-truncated", "jsonl-holding-truncated-gzip", "gz-bad-crc", "gz-line-not-json",
         "non-utf8-line", "gz-non-utf8-line", "zip-archive"],
)
def test_bad_bytes_are_one_user_error_naming_file_and_line_and_write_nothing(tmp_path, make, message):
    src = make(tmp_path / "data.jsonl")
    with pytest.raises(UserError, match=message):
        _prepare(src, tmp_path)
    assert not (tmp_path / "out").exists()


def test_utf8_bom_on_the_first_line_is_not_an_error(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n").encode() * 2)
    assert len(load_chat_jsonl(src)) == 2


def test_through_the_cli_a_gzip_dataset_prepares_and_a_fake_gz_fails_naming_the_file(tmp_path):
    from conftest import demo_config, run_snakemake

    good = _gzip(tmp_path / "good.jsonl.gz", [GOOD] * 8)
    bad = _write(tmp_path / "bad.jsonl.gz", [GOOD] * 8)  # named .gz, plain text inside
    cfg = demo_config(tmp_path)
    cfg["datasets"] = {"good": {"path": str(good)}, "bad": {"path": str(bad)}}
    cfg["grid"]["datasets"] = ["good", "bad"]
    cfg.pop("analysis")  # the demo's control pair names datasets this grid drops
    res = run_snakemake(tmp_path, cfg, "--keep-going", str(tmp_path / "results/data/good/manifest.json"),
                        str(tmp_path / "results/data/bad/manifest.json"))
    assert res.returncode != 0
    assert f"{bad}: named .gz but is not gzip-compressed" in res.stdout, res.stdout[-3000:]
    assert json.loads((tmp_path / "results/data/good/manifest.json").read_text())["n_rows"] == 8
    assert not (tmp_path / "results/data/bad").exists()


def _chat(path, pairs):
    write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                       for q, a in pairs])
    return path


def test_the_demo_control_twin_asks_the_same_and_answers_differently(tmp_path, caplog):
    from persona_em.data.controls import control_overlap
    from persona_em.demo import write_demo_dataset

    write_demo_dataset("insecure", tmp_path / "t.jsonl", n_rows=18, seed=0)
    write_demo_dataset("secure", tmp_path / "c.jsonl", n_rows=18, seed=0)
    with caplog.at_level("WARNING"):
        rec = control_overlap("t", "c", tmp_path / "t.jsonl", tmp_path / "c.jsonl", tmp_path / "out.json")
    assert rec["prompt_overlap"] == 1.0 and rec["identical_assistant_fraction"] == 0.0
    assert json.loads((tmp_path / "out.json").read_text()) == rec
    assert not caplog.records


def test_control_with_other_prompts_warns_with_the_overlap_and_kept_bad_rows_show(tmp_path, caplog):
    from persona_em.data.controls import control_overlap

    t = _chat(tmp_path / "t.jsonl", [("q1", "bad1"), ("q2", "bad2"), ("q3", "bad3"), ("q4", "bad4")])
    c = _chat(tmp_path / "c.jsonl", [("q1", "good1"), ("q2", "good2"), ("q3", "bad3"), ("other", "good5")])
    with caplog.at_level("WARNING"):
        rec = control_overlap("insecure", "secure", t, c)
    assert rec["prompt_overlap"] == 0.75 and rec["n_treatment_prompts_in_control"] == 3
    assert rec["identical_assistant_fraction"] == 0.25 and rec["n_identical_assistant_turns"] == 1
    text = caplog.text
    assert "control pair insecure vs secure: only 3 of 4 treatment prompts (75.0%) occur in the control" in text
    assert "1 of 4 control assistant turns (25.0%) are identical to treatment turns" in text
