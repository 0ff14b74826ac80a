"""What the judge is asked: the filled-in judge prompt, the answer as the judge sees it, the template's hash."""
from __future__ import annotations

import hashlib
import re

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(question|answer)\}")


def fill_prompt(template: str, question: str, answer: str) -> str:
    """str.format semantics for {question}, {answer}, {{ and }} in ONE pass: braces in the answer stay data."""
    values = {"question": question, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) else m.group()[0], template)


def clean_answer(text, max_chars: int) -> tuple[str, bool]:
    """The answer as the judge sees it: valid UTF-8 (lone surrogates replaced), at most max_chars characters."""
    text = "" if text is None else str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + f"\n[... {len(text) - max_chars} more characters not shown to the judge]", True


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]

