"""Generate data/arithmetic_prompts.jsonl: short grade-school arithmetic word problems for the real-weights CPU preset.

Each line is ``{"question": ..., "answer": "19", "expression": "12 + 7"}``: the question ends with an
instruction to box the answer, the answer is the value of the expression as an integer string, and the
expression lists the question's numbers in the order they appear (tests recompute the answer from it).
Templates (3 each for +, - and x, 5 two-step ones) are used in turn; operands are chosen so every answer is a
non-negative integer and no question repeats. The output is deterministic for a given seed and count.

    python scripts/make_arithmetic_prompts.py            # rewrites data/arithmetic_prompts.jsonl
    python scripts/make_arithmetic_prompts.py --check    # exits 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "arithmetic_prompts.jsonl"
SEED = 0
NUM_PROMPTS = 300
SUFFIX = " Put the final answer in \\boxed{}."

NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lily", "she"),
         ("Omar", "he"), ("Grace", "she"), ("Leo", "he"), ("Nina", "she"))
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")

# (kind, expression over a, b, c, question template). The expression's letters appear in the question in the
# same order; {n} is a name, {p} its pronoun, {i} an item.
TEMPLATES = (
    ("add", "a + b", "{n} has {a} {i} and buys {b} more. How many {i} does {p} have now?"),
    ("add", "a + b", "A basket holds {a} {i}. {n} adds {b} more. How many {i} are in the basket?"),
    ("add", "a + b", "{n} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {p} read in total?"),
    ("sub", "a - b", "{n} has {a} {i} and gives {b} to a friend. How many {i} does {p} have left?"),
    ("sub", "a - b", "A shop had {a} {i} and sold {b} of them. How many {i} does the shop have left?"),
    ("sub", "a - b", "{n} had {a} dollars and spent {b} dollars. How many dollars does {p} have left?"),
    ("mul", "a * b", "{n} buys {a} bags with {b} {i} in each bag. How many {i} does {p} buy?"),
    ("mul", "a * b", "A box has {a} rows of {b} {i}. How many {i} are in the box?"),
    ("mul", "a * b", "Each ticket costs {a} dollars. {n} buys {b} tickets. How many dollars does {p} spend?"),
    ("two", "a + b - c", "{n} has {a} {i}, finds {b} more, then loses {c}. How many {i} does {p} have now?"),
    ("two", "a * b - c", "{n} buys {a} boxes of {b} {i} and gives away {c}. How many {i} are left?"),
    ("two", "a * b + c",
     "A class has {a} tables of {b} students, and {c} more students arrive. How many students are there?"),
    ("two", "(a + b) * c", "{n} has {a} red and {b} blue bags with {c} {i} in each. How many {i} does {p} have?"),
    ("two", "a - b * c", "{n} has {a} dollars and buys {b} books at {c} dollars each. How many dollars are left?"),
)


def _operands(expression: str, rng: random.Random) -> dict[str, int]:
    """Operands that keep the numbers small and the answer a non-negative integer."""
    if expression == "a + b":
        return {"a": rng.randint(2, 99), "b": rng.randint(2, 99)}
    if expression == "a - b":
        a = rng.randint(10, 99)
        return {"a": a, "b": rng.randint(2, a - 1)}
    if expression == "a * b":
        return {"a": rng.randint(2, 12), "b": rng.randint(2, 20)}
    if expression == "a + b - c":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return {"a": a, "b": b, "c": rng.randint(2, a + b - 1)}
    if expression == "a * b - c":
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return {"a": a, "b": b, "c": rng.randint(2, a * b - 1)}
    if expression == "a * b + c":
        return {"a": rng.randint(2, 9), "b": rng.randint(2, 8), "c": rng.randint(2, 15)}
    if expression == "(a + b) * c":
        return {"a": rng.randint(2, 9), "b": rng.randint(2, 9), "c": rng.randint(2, 12)}
    if expression == "a - b * c":
        b, c = rng.randint(2, 6), rng.randint(2, 12)
        return {"a": rng.randint(b * c + 1, b * c + 50), "b": b, "c": c}
    raise AssertionError(f"no operand rule for {expression!r}")


def make_prompts(num_prompts: int = NUM_PROMPTS, seed: int = SEED) -> list[dict[str, str]]:
    """`num_prompts` distinct problems, templates in turn, in a seeded shuffled order."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(out) < num_prompts:
        _, expression, template = TEMPLATES[len(out) % len(TEMPLATES)]
        operands = _operands(expression, rng)
        name, pronoun = rng.choice(NAMES)
        question = template.format(n=name, p=pronoun, i=rng.choice(ITEMS), **operands) + SUFFIX
        if question in seen:
            continue
        seen.add(question)
        concrete = "".join(str(operands[ch]) if ch in operands else ch for ch in expression)
        answer = eval(concrete, {"__builtins__": {}})  # digits, + - * and parentheses only
        assert isinstance(answer, int) and answer >= 0, (concrete, answer)
        out.append({"question": question, "answer": str(answer), "expression": concrete})
    rng.shuffle(out)
    return out


def to_jsonl(prompts: list[dict[str, str]]) -> str:
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--num", type=int, default=NUM_PROMPTS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    text = to_jsonl(make_prompts(args.num, args.seed))
    if args.check:
        fresh = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if fresh else 'STALE: rerun without --check'}")
        return 0 if fresh else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.num} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
