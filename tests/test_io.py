import json

import pytest

from persona_em.io import Journal, atomic_path, write_json


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}


def test_journal_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, key_field="k")
    j.append({"k": "a", "v": 1})
    j.append({"k": "b", "v": 2})
    j.close()
    with open(path, "a") as f:
        f.write('{"k": "c", "v"')  # the process died mid-write
    j = Journal(path, key_field="k")
    assert sorted(j.load()) == ["a", "b"]
    j.append({"k": "c", "v": 3})
    j.close()
    assert [json.loads(line)["k"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
