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


WRITER = """
import sys, time
from persona_em.io import atomic_dir, atomic_path
kind, target, hang = sys.argv[1], sys.argv[2], sys.argv[3] == "hang"
if kind == "file":  # a figure's writer: matplotlib needs the suffix
    with atomic_path(target, suffix=".svg") as tmp:
        if hang:
            print("writing", flush=True)
            time.sleep(120)
        tmp.write_text("whole")
else:  # an adapter's writer
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_text("half" if hang else "whole")
        if hang:
            print("writing", flush=True)
            time.sleep(120)
"""


@pytest.mark.parametrize("kind, name", [("file", "fig.svg"), ("dir", "em")])
def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path, kind, name):
    """SIGKILL cannot be caught: the killed writer's temporary stays until the same target is written again."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    results = tmp_path / "results"
    target = results / "figures" / name
    other = results / "figures" / f"{name}.keep"  # another target's temporary in the same folder: not touched
    other.parent.mkdir(parents=True)
    (other.parent / f".{other.name}.abcd1234.tmp").write_text("another writer's")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), "hang"], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in results.rglob("*.tmp*"))
    assert len(left) == 2 and not target.exists(), left  # the killed writer's temporary is there
    subprocess.run([sys.executable, "-c", WRITER, kind, str(target), "finish"], env=env, check=True)
    assert sorted(p.name for p in results.rglob("*.tmp*")) == [f".{other.name}.abcd1234.tmp"]
    assert (target.read_text() if kind == "file" else (target / "adapter_model.safetensors").read_text()) == "whole"


def test_atomic_outputs_get_the_umask_mode_not_tempfiles_private_one(tmp_path):
    """Outputs in a shared results_dir / cache_dir must be readable by the project's group, as open() would make them."""
    import os

    from persona_em.io import atomic_dir, write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "a").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
