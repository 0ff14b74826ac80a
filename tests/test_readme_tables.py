"""The README's way of reading a table gives back what was written: the status "null" stays the string."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

import persona_em.io
from persona_em.io import write_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_reader_the_readme_gives_keeps_null_and_na_strings(tmp_path):
    text = README.read_text()
    paragraph = text[text.index("Tables are tab-separated"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    calls = re.findall(r"`((?:pandas|persona_em\.io)\.read_\w+\([^`]*\))`", paragraph)
    assert calls, paragraph
    path = tmp_path / "scores.tsv"
    write_table(path, pd.DataFrame({"status": ["null", "scored"], "score": [None, 42.0],
                                    "response": ["a\tb\nc", "NA"]}))
    for call in calls:
        got = eval(call, {"pandas": pd, "persona_em": persona_em, "path": path})  # noqa: S307 (the README's text)
        assert got["status"].tolist() == ["null", "scored"], call
        assert got["response"].tolist() == ["a\tb\nc", "NA"], call
        assert pd.isna(got["score"][0]) and got["score"][1] == 42, call
