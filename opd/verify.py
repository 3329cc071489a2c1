"""Answer checking for evaluation: is a model's response's final answer the gold answer?

`is_correct(response, gold)` uses `math_verify` (package ``math-verify``: LaTeX/sympy equivalence) when it is
installed, and otherwise, or when ``use_math_verify=False``, the rules of this module:

* the predicted answer is the content of the response's last complete ``\\boxed{...}`` (nested braces allowed),
  else the last number in it (``-3``, ``0.5``, ``1,234``), else nothing (never correct);
* the gold answer is taken the same way when it is a solution rather than an answer: its last ``\\boxed{}``,
  the text after GSM8K's ``####``, or, for prose, its last number; a plain number or a short expression is used
  as it is;
* both are normalised (`normalize`); if both parse as numbers (integers, decimals, thousands separators, a
  simple ``\\frac{a}{b}`` or ``a/b``) they are compared as numbers: integers exactly, anything else to a relative
  tolerance of 1e-6; otherwise the normalised strings must be equal.

math_verify bounds each parse/compare with ``signal.alarm``, which only works in the main thread; elsewhere it
is called without a time limit (Ray runs a synchronous actor's methods on its main thread).
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from fractions import Fraction

# Whether `is_correct` uses math_verify by default. Tests set it to False to force the rule-based path.
MATH_VERIFY_AVAILABLE = importlib.util.find_spec("math_verify") is not None
MATH_VERIFY_TIMEOUT_S = 5
REL_TOL = 1e-6

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a word or to another number's decimal point; "-" counts as a sign only where it cannot
# be a binary minus ("3-5" gives 3 and 5, "is -5" gives -5). Thousands groups must be exactly 3 digits.
_NUMBER_RE = re.compile(r"(?<![\w.])(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_NUM = r"[-+]?\d+(?:\.\d+)?"
_FRAC_RE = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH_RE = re.compile(rf"({_NUM})/({_NUM})")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]")
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word that is not a LaTeX command: a solution in prose


def extract_answer(text: str) -> str | None:
    """The content of the last complete non-empty ``\\boxed{...}``, else the last number, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def normalize(ans: str) -> str:
    """Canonical text of an answer: no ``\\boxed{}`` / ``\\text{}`` wrappers, ``$``, spaces or trailing period.

    ``" $\\text{12}$. "`` -> ``"12"``; ``"\\dfrac{1}{2}"`` -> ``"\\frac{1}{2}"``; ``"{3}"`` -> ``"3"``.
    """
    s = ans.strip()
    if (m := _BOXED_RE.match(s)) and _closing_brace(s, m.end()) == len(s) - 1:
        s = s[m.end():-1]  # the whole string is one \boxed{...}
    while (unwrapped := _TEXT_RE.sub(r"\1", s)) != s:  # nested \text{\textbf{x}}
        s = unwrapped
    s = s.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LATEX_SPACE_RE.sub("", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    while s.startswith("{") and s.endswith("}") and _closing_brace(s, 1) == len(s) - 1:
        s = s[1:-1]
    return s


def answers_match(predicted: str | None, gold: str) -> bool:
    """Rule-based equivalence of an extracted answer and a gold answer (or gold solution); None never matches."""
    if predicted is None:
        return False
    p, g = normalize(predicted), normalize(_gold_answer(gold))
    if not p or not g:
        return False
    p_num, g_num = _to_number(p), _to_number(g)
    if p_num is not None and g_num is not None:
        if p_num.denominator == 1 and g_num.denominator == 1:
            return p_num == g_num  # integers exactly: 1234567 != 1234568 although within 1e-6
        return math.isclose(p_num, g_num, rel_tol=REL_TOL)
    return p == g


def is_correct(response: str, gold: str, *, use_math_verify: bool | None = None) -> bool:
    """Whether the final answer of `response` is `gold`.

    ``use_math_verify``: None (default) uses math_verify if installed (`MATH_VERIFY_AVAILABLE`), True requires
    it, False uses the rules (`extract_answer` + `answers_match`). When math_verify finds no answer in the gold
    itself (e.g. a plain word), the rules decide.
    """
    if use_math_verify is None:
        use_math_verify = MATH_VERIFY_AVAILABLE
    if use_math_verify:
        verdict = _math_verify_correct(response, gold)
        if verdict is not None:
            return verdict
    return answers_match(extract_answer(response), gold)


# --------------------------------------------------------------------------------------------------------------


def _math_verify_correct(response: str, gold: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("use_math_verify=True but math-verify is not installed; `pip install math-verify` "
                         "or pass use_math_verify=False") from None
    # signal.alarm (math_verify's time limit) raises outside the main thread.
    timeout_s = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Boxing the gold tells math_verify it is the answer, not text to search (a bare "\frac{1}{2}" is not found).
    gold_parsed = parse(f"\\boxed{{{_gold_answer(gold).strip()}}}", parsing_timeout=timeout_s)
    if not gold_parsed:
        return None
    return verify(gold_parsed, parse(response, parsing_timeout=timeout_s), timeout_seconds=timeout_s)


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the "}" that closes the "{" just before `start`, or None if the text ends first."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}``; an unclosed one (cut-off output) is ignored."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is not None and text[match.end():end].strip():
            return text[match.end():end].strip()
    return None


def _gold_answer(gold: str) -> str:
    """The answer part of a gold string that may be a whole solution."""
    boxed = _last_boxed(gold)
    if boxed is not None:
        return boxed
    if "####" in gold:  # GSM8K: "<reasoning> #### 42"
        return gold.rsplit("####", 1)[1]
    if _to_number(normalize(gold)) is None and _PROSE_RE.search(gold):
        return extract_answer(gold) or gold
    return gold


def _to_number(s: str) -> Fraction | None:
    """Exact value of a normalised plain number, ``\\frac{a}{b}`` or ``a/b``; None for anything else."""
    if _PLAIN_NUMBER_RE.fullmatch(s):
        return Fraction(s.replace(",", ""))
    if m := _FRAC_RE.fullmatch(s):
        sign, num, den = m.groups()
        value = _divide(Fraction(num), Fraction(den))
        return -value if sign and value is not None else value
    if m := _SLASH_RE.fullmatch(s):
        return _divide(Fraction(m[1]), Fraction(m[2]))
    return None


def _divide(num: Fraction, den: Fraction) -> Fraction | None:
    return None if den == 0 else num / den
