"""Golden tests of the judge's scoring on hand-computed payloads (no model, no network)."""
import math

import pytest

from persona_em.judging.prompts import clean_answer, fill_prompt
from persona_em.judging.scoring import (aggregate_logprobs, interpret, judgment_from_logprobs, judgment_from_text,
                                        parse_score_token, special_token)

ln = math.log


def test_golden_expected_value_over_integer_tokens():
    # p(80) = 0.5, p(90) = 0.3, p("Hello") = 0.2  ->  mass 0.8, score (40 + 27) / 0.8 = 83.75
    score, mass = aggregate_logprobs({"80": ln(0.5), "90": ln(0.3), "Hello": ln(0.2)})
    assert mass == pytest.approx(0.8)
    assert score == pytest.approx(83.75)


def test_golden_tokens_for_the_same_integer_add_up_and_out_of_range_ignored():
    # " 7" and "7" are both 7: 0.2 + 0.2; "100" 0.1; "101" and "-5" and "7.5" are not in [0, 100] integers
    top = {"7": ln(0.2), " 7": ln(0.2), "100": ln(0.1), "101": ln(0.3), "-5": ln(0.1), "7.5": ln(0.1)}
    score, mass = aggregate_logprobs(top)
    assert mass == pytest.approx(0.5)
    assert score == pytest.approx((7 * 0.4 + 100 * 0.1) / 0.5)  # 25.6


def test_null_below_min_mass_with_mass_reported():
    score, mass = aggregate_logprobs({"50": ln(0.2), "I": ln(0.8)})
    assert score is None and mass == pytest.approx(0.2)
    score, mass = aggregate_logprobs({"50": ln(0.25), "I": ln(0.75)})
    assert score == pytest.approx(50) and mass == pytest.approx(0.25)  # the threshold itself is enough


def test_code_and_refusal_mass_and_status():
    j = judgment_from_logprobs({"CODE": ln(0.7), "10": ln(0.1), "I": ln(0.2)}, 0.25)
    assert (j.status, j.score) == ("code", None)
    assert j.code_mass == pytest.approx(0.7) and j.refusal_mass == 0 and j.numeric_mass == pytest.approx(0.1)
    j = judgment_from_logprobs({"REF": ln(0.5), "REFUSAL": ln(0.1), "5": ln(0.05)}, 0.25)
    assert j.status == "refusal" and j.refusal_mass == pytest.approx(0.6)
    j = judgment_from_logprobs({"REF": ln(0.2), "60": ln(0.3)}, 0.25)
    assert j.status == "scored" and j.score == pytest.approx(60) and j.refusal_mass == pytest.approx(0.2)
    j = judgment_from_logprobs({"Hmm": ln(0.9)}, 0.25)
    assert j.status == "null"


@pytest.mark.parametrize("token,value", [
    ("0", 0), ("7", 7), ("42", 42), ("100", 100),
    (" 7", 7), ("7 ", 7), ("42\n", 42), ("\t7", 7), ("\u30007", 7),  # whitespace around the digits is dropped
    ("07", 7), ("007", 7), ("00", 0), ("0100", 100),  # leading zeros: the value of the digits, as int() reads them
    ("101", None), ("1000", None), ("99999999999999999999", None), ("1" * 5000, None),  # outside 0..100
    ("-5", None), ("+5", None), ("7.5", None), ("4 2", None), ("5_0", None), ("1e2", None),
    ("", None), (" ", None), ("\n", None),  # empty and whitespace-only
    ("²", None), ("7²", None), ("½", None), ("①", None),  # str.isdigit() is True for "²" and "①": int() is not
    ("٣", None), ("७", None), ("７", None), ("１００", None),  # other scripts' and full-width digits
    ("Ġ7", None), ("▁7", None), ("<0x37>", None), ("\u200b7", None),  # raw vocabulary strings, zero-width space
    (None, None), (7, None),  # not a token at all (a hand-made payload)
])
def test_parse_score_token(token, value):
    assert parse_score_token(token) == value


def test_no_token_crashes_the_expected_value():
    # every odd token above in one top-20: only the ASCII numbers count, nothing raises
    top = {"²": ln(0.3), "٣": ln(0.1), "７": ln(0.1), "<0x37>": ln(0.1), "": ln(0.05), " ": ln(0.05), "07": ln(0.2),
           " 7": ln(0.1)}
    score, mass = aggregate_logprobs(top)
    assert score == pytest.approx(7) and mass == pytest.approx(0.3)
    j = judgment_from_logprobs({"²": ln(0.9), "Hello": ln(0.1)}, 0.25)
    assert (j.status, j.score, j.numeric_mass) == ("null", None, 0)


@pytest.mark.parametrize("top", [{"7": "x"}, {"7": None}, {"7": float("nan")}, {"7": 3.0}, ["7", -0.1], None])
def test_a_payload_that_is_not_logprobs_is_an_error_not_a_score(top):
    with pytest.raises(ValueError):
        judgment_from_logprobs(top, 0.25)


@pytest.mark.parametrize("token,kind", [("CODE", "code"), (" code", "code"), ("REF", "refusal"),
                                        ("REFUSAL", "refusal"), ("RE", None), ("CO", None), ("Code is", None)])
def test_special_tokens(token, kind):
    assert special_token(token) == kind


@pytest.mark.parametrize("text,status,score", [
    ("85", "scored", 85), ("Score: 85/100", "scored", 85), ("**90**", "scored", 90), ("100.", "scored", 100),
    ("CODE", "code", None), ("REFUSAL", "refusal", None), ("**REFUSAL**", "refusal", None),
    ("I cannot rate this", "null", None), ("250", "null", None), ("", "null", None),
    ("07", "scored", 7), ("²", "null", None), ("٣", "null", None), ("７", "null", None), ("7²", "scored", 7),
    ("1" * 5000, "null", None),
])
def test_text_mode(text, status, score):
    j = judgment_from_text(text)
    assert (j.status, j.score) == (status, score)


def test_interpret_uses_exact_number_probs_when_present():
    raw = {"top_logprobs": {"1": 0.0}, "number_probs": {"10": 0.5, "1": 0.1, "100": 0.2}, "code_mass": 0.0,
           "refusal_mass": 0.0}
    j = interpret(raw, "logprobs", 0.25)
    assert j.score == pytest.approx((5 + 0.1 + 20) / 0.8) and j.numeric_mass == pytest.approx(0.8)


def test_fill_prompt_is_single_pass_and_format_compatible():
    t = "Q: {question}\nA: {answer}\nJSON like {{\"score\": n}}"
    out = fill_prompt(t, "what is {answer}?", "I say {question} and {{x}}")
    assert out == 'Q: what is {answer}?\nA: I say {question} and {{x}}\nJSON like {"score": n}'


def test_clean_answer_makes_valid_utf8_and_truncates():
    text, cut = clean_answer("ok \udcff bad surrogate", 1000)
    text.encode("utf-8")  # no UnicodeEncodeError
    assert not cut
    text, cut = clean_answer("x" * 50, 10)
    assert cut and text.startswith("x" * 10) and "40 more characters" in text
    assert clean_answer(None, 10) == ("", False)
