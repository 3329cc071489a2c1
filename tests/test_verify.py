"""opd/verify.py: answer extraction, normalisation, equivalence, and `is_correct` through math_verify (when
installed) and through the rules (forced)."""

from __future__ import annotations

import sys
import threading

import pytest

from opd import verify
from opd.verify import answers_match, extract_answer, is_correct, normalize

HAS_MATH_VERIFY = verify.MATH_VERIFY_AVAILABLE


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{19}.", "19"),
    ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\text{x}^{2}+{1}} done", "\\text{x}^{2}+{1}"),
    ("\\boxed{ 1,234 }", "1,234"),
    ("\\fbox{8}", "8"),
    ("\\boxed{7} and a cut-off \\boxed{12", "7"),  # an unclosed box is ignored
    ("\\boxed{12", "12"),  # ... falling back to the last number
    ("\\boxed{} then 5", "5"),  # an empty box (the instruction echoed) is no answer
    ("12 + 7 = 19 apples.", "19"),  # last number
    ("it is 19.5.", "19.5"),
    ("a total of 1,234 stamps", "1,234"),
    ("1,2345", "2345"),  # not a thousands separator
    ("the result is -5", "-5"),
    ("10-3", "3"),  # binary minus, not a sign
    ("x2 and v3", None),  # digits glued to words are not numbers
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw, expected", [
    (" $\\text{12}$. ", "12"),
    ("\\boxed{ 7 }", "7"),
    ("{3}", "3"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("x + 1", "x+1"),
    ("\\textbf{\\text{blue}}", "blue"),
    ("1\\,000", "1000"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("predicted, gold", [
    ("1,234", "1234"),
    ("1234", "1,234"),
    ("0.50", "0.5"),
    ("3", "3.0"),
    ("-3", "-3.00"),
    ("\\frac{1}{2}", "0.5"),
    ("-\\frac{1}{2}", "-0.5"),
    ("1/4", "0.25"),
    ("0.3333333", "\\frac{1}{3}"),  # within 1e-6 relative
    ("$12$", "12."),
    ("\\text{blue}", "blue"),
    ("x^2+1", "x^2 + 1"),
    ("19", "\\boxed{19}"),  # a boxed gold
    ("19", "12 + 7 makes 19 in total, so \\boxed{19}."),  # a gold solution
    ("72", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72 #### 72"),  # GSM8K
    ("7", "She had 3 and found 4, so 7."),  # prose: its last number
])
def test_answers_match(predicted, gold):
    assert answers_match(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    (None, "5"),
    ("", "5"),
    ("5", ""),
    ("18", "19"),
    ("-5", "5"),
    ("1234567", "1234568"),  # integers compare exactly
    ("0.5001", "0.5"),
    ("1", "x^2+1"),  # an expression gold is not reduced to its last number
    ("garbage", "5"),
    ("\\frac{1}{0}", "0"),
])
def test_answers_do_not_match(predicted, gold):
    assert not answers_match(predicted, gold)


# Cases both paths must agree on.
CORRECT = [
    ("12 + 7 = 19. So Tom has \\boxed{19} apples.", "19"),
    ("The answer is \\boxed{1,234}.", "1234"),
    ("The answer is 1234", "1,234"),
    ("\\boxed{0.50}", "0.5"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{-5}", "-5"),
    ("\\boxed{72}", "48/2 = 24 in May, 48+24 = 72 #### 72"),
]
WRONG = [
    ("\\boxed{18}", "19"),
    ("I think 7, then \\boxed{19}", "7"),  # the box decides, not an earlier number
    ("asdf qwer", "19"),
    ("", "19"),
    ("\\boxed{5}", "-5"),
]


@pytest.mark.parametrize("response, gold", CORRECT)
def test_is_correct_rules(response, gold):
    assert is_correct(response, gold, use_math_verify=False)


@pytest.mark.parametrize("response, gold", WRONG)
def test_is_wrong_rules(response, gold):
    assert not is_correct(response, gold, use_math_verify=False)


def test_module_flag_forces_the_rules(monkeypatch):
    # With the flag off, is_correct must not touch math_verify at all.
    monkeypatch.setattr(verify, "MATH_VERIFY_AVAILABLE", False)
    monkeypatch.setattr(verify, "_math_verify_correct", lambda *a: pytest.fail("math_verify was used"))
    assert is_correct("\\boxed{19}", "19") and not is_correct("\\boxed{18}", "19")


def test_default_uses_math_verify_when_available(monkeypatch):
    calls = []
    monkeypatch.setattr(verify, "MATH_VERIFY_AVAILABLE", True)
    monkeypatch.setattr(verify, "_math_verify_correct", lambda r, g: calls.append((r, g)) or False)
    assert not is_correct("\\boxed{19}", "19")  # math_verify's verdict stands
    assert calls == [("\\boxed{19}", "19")]
    monkeypatch.setattr(verify, "_math_verify_correct", lambda r, g: None)  # no answer found in the gold
    assert is_correct("\\boxed{19}", "19")  # ... so the rules decide


def test_requiring_math_verify_without_it_says_how_to_install(monkeypatch):
    # math-verify absent, simulated whether or not it is installed: its import fails as for a missing package
    monkeypatch.setitem(sys.modules, "math_verify", None)
    monkeypatch.setattr(verify, "MATH_VERIFY_AVAILABLE", False)
    with pytest.raises(ValueError, match="pip install math-verify"):
        is_correct("\\boxed{1}", "1", use_math_verify=True)
    # the default then checks with the rules, and says nothing
    assert is_correct("\\boxed{19}", "19") and not is_correct("\\boxed{18}", "19")


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
class TestMathVerify:
    @pytest.mark.parametrize("response, gold", CORRECT)
    def test_correct(self, response, gold):
        assert is_correct(response, gold, use_math_verify=True)
        assert is_correct(response, gold)  # the default when installed

    @pytest.mark.parametrize("response, gold", WRONG)
    def test_wrong(self, response, gold):
        assert not is_correct(response, gold, use_math_verify=True)

    def test_symbolic_equivalence_beyond_the_rules(self):
        assert is_correct("\\boxed{x^2+1}", "1+x^2", use_math_verify=True)
        assert not is_correct("\\boxed{x^2+1}", "1+x^2", use_math_verify=False)

    def test_gold_without_an_answer_falls_back_to_the_rules(self):
        assert is_correct("\\boxed{blue}", "blue", use_math_verify=True)

    def test_works_outside_the_main_thread(self):
        # math_verify's signal-based time limit cannot be used off the main thread; is_correct must still work.
        results = []
        thread = threading.Thread(target=lambda: results.append(is_correct("\\boxed{19}", "19")))
        thread.start()
        thread.join()
        assert results == [True]
