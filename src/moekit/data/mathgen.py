"""Seeded math problems with exact answers, and the checker that scores a model's answer.

The math domain is generated rather than collected so that every problem has one exact answer
(an integer or a reduced fraction): test-time methods (sampling, voting, verification) can then be
scored by accuracy, not only by loss. Problem `i` of seed `s` depends only on `(s, i)`, so the
first N problems are the same whatever the count asked for, on every Python version.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from moekit.errors import MoekitError

QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "\nA:"


@dataclass(frozen=True)
class MathProblem:
    """One problem: the prompt a model continues, and the exact answer it should produce."""

    question: str
    answer: str
    kind: str

    @property
    def prompt(self) -> str:
        """What a model is given: the question followed by 'A:'."""
        return f"{QUESTION_PREFIX}{self.question}{ANSWER_PREFIX}"

    @property
    def text(self) -> str:
        """The document text the model is trained on: prompt, a space and the answer."""
        return f"{self.prompt} {self.answer}"

    def check(self, generation: str) -> bool:
        return check_answer(self.answer, generation)


def format_number(value: Fraction | int) -> str:
    """An exact number as text: '12', '-3', '19/12', '-7/4' (always reduced)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


_NUMBER = re.compile(r"([+-]?\d+)(?:\s*/\s*(\d+)|\.(\d+))?")
_ANSWER = re.compile(r"(?:[a-z]\s*=\s*)?(" + _NUMBER.pattern + r")\.?")


def parse_number(text: str) -> Fraction | None:
    """'5', '-19/12', '0.75' as an exact Fraction; None when the text is not one number."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    whole, denominator, decimals = match.groups()
    if denominator is not None:
        if int(denominator) == 0:
            return None
        return Fraction(int(whole), int(denominator))
    if decimals is not None:
        sign = -1 if whole.startswith("-") else 1
        return Fraction(int(whole)) + sign * Fraction(int(decimals), 10 ** len(decimals))
    return Fraction(int(whole))


def extract_answer(generation: str) -> str:
    """The answer part of a model's continuation of a prompt: its first line, stripped."""
    return generation.strip().split("\n", 1)[0].strip()


def check_answer(expected: str, generation: str) -> bool:
    """True when the first line of `generation` is the expected number ('x = 5' and '10/4' count)."""
    target = parse_number(expected)
    if target is None:
        raise MoekitError(f"math answer: {expected!r} is not a number (expected e.g. '12' or '-7/4')")
    match = _ANSWER.fullmatch(extract_answer(generation))
    return match is not None and parse_number(match.group(1)) == target


def generate_problem(seed: int, index: int) -> MathProblem:
    """Problem `index` of the stream for `seed`; independent of every other index."""
    rng = random.Random(f"moekit-math:{seed}:{index}")
    kind = rng.choice(sorted(_GENERATORS))
    question, answer = _GENERATORS[kind](rng)
    return MathProblem(question=question, answer=format_number(answer), kind=kind)


def generate_problems(seed: int, count: int, start: int = 0) -> list[MathProblem]:
    return [generate_problem(seed, index) for index in range(start, start + count)]


def problem_from_text(text: str, answer: str, kind: str = "") -> MathProblem:
    """Rebuild a problem from a stored document; the text must be 'Q: ...\\nA: <answer>'."""
    if not text.startswith(QUESTION_PREFIX) or ANSWER_PREFIX not in text:
        raise MoekitError(f"math document: expected 'Q: ...\\nA: ...', got {text[:60]!r}")
    question = text[len(QUESTION_PREFIX) : text.rindex(ANSWER_PREFIX)]
    problem = MathProblem(question=question, answer=answer, kind=kind)
    if problem.text != text:
        raise MoekitError(f"math document: its text does not end with the answer {answer!r}")
    return problem


def accuracy(problems: Iterable[MathProblem], generations: Iterable[str]) -> float:
    """Fraction of problems whose generation checks; the two iterables are zipped strictly."""
    results = [p.check(g) for p, g in zip(problems, generations, strict=True)]
    return sum(results) / len(results) if results else 0.0


# ----- problem kinds: each returns (question, exact answer) -----


def _signed(rng: random.Random, low: int, high: int) -> int:
    value = rng.randint(low, high)
    return -value if rng.random() < 0.3 else value


def _digits(rng: random.Random) -> int:
    return rng.choice((1, 2, 2, 3, 3, 4))


def _operand(rng: random.Random) -> int:
    digits = _digits(rng)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _add(rng):
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(("What is {a} + {b}?", "Calculate {a} plus {b}.", "Add {a} and {b}."))
    return template.format(a=a, b=b), a + b


def _sub(rng):
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"))
    return template.format(a=a, b=b), a - b


def _mul(rng):
    a, b = _operand(rng), rng.randint(2, 99)
    template = rng.choice(
        ("What is {a} * {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?")
    )
    return template.format(a=a, b=b), a * b


def _div(rng):
    b, q = rng.randint(2, 60), rng.randint(2, 400)
    template = rng.choice(("What is {a} / {b}?", "Divide {a} by {b}."))
    return template.format(a=b * q, b=b), q


def _remainder(rng):
    a, b = _operand(rng) + 10, rng.randint(3, 40)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def _expression(rng):
    def term() -> tuple[str, int]:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"({a} {op} {b})", value

    (left, lv), (right, rv) = term(), term()
    op = rng.choice("+-*")
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"Evaluate {left} {op} {right}.", value


def _linear_side(coefficient: int, variable: str, constant: int) -> str:
    lead = (
        variable if coefficient == 1 else f"-{variable}" if coefficient == -1 else f"{coefficient}{variable}"
    )
    if constant == 0:
        return lead
    return f"{lead} {'+' if constant > 0 else '-'} {abs(constant)}"


def _linear(rng):
    variable = rng.choice("xyznt")
    a, b = _signed(rng, 1, 12), _signed(rng, 0, 50)
    c = a * _signed(rng, 0, 30) + b
    if abs(a) > 1 and rng.random() < 0.25:
        c += rng.randint(1, abs(a) - 1)  # a fractional solution
    return f"Solve for {variable}: {_linear_side(a, variable, b)} = {c}.", Fraction(c - b, a)


def _fraction(rng):
    p, q = rng.randint(1, 12), rng.randint(2, 12)
    r, s = rng.randint(1, 12), rng.randint(2, 12)
    op, word = rng.choice((("+", "+"), ("-", "-"), ("*", "*"), ("/", "divided by")))
    x, y = Fraction(p, q), Fraction(r, s)
    value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
    return f"What is {p}/{q} {word} {r}/{s}?", value


def _gcd(rng):
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)


def _lcm(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is the least common multiple of {a} and {b}?", math.lcm(a, b)


def _power(rng):
    base, exponent = _signed(rng, 2, 12), rng.randint(2, 5)
    shown = f"({base})" if base < 0 else str(base)
    template = rng.choice(("What is {b}^{e}?", "What is {b} to the power of {e}?"))
    return template.format(b=shown, e=exponent), base**exponent


def _percent(rng):
    percent = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 125, 150))
    step = 100 // math.gcd(percent, 100)
    whole = step * rng.randint(1, 400 // step + 2)
    return f"What is {percent}% of {whole}?", Fraction(percent * whole, 100)


def _polynomial(rng):
    coefficients = [_signed(rng, 0, 9) for _ in range(rng.randint(2, 4))]
    coefficients[0] = coefficients[0] or 1
    degree = len(coefficients) - 1
    parts: list[str] = []
    for power, c in zip(range(degree, -1, -1), coefficients, strict=True):
        if c == 0:
            continue
        magnitude = abs(c)
        body = "x" if power == 1 else f"x^{power}" if power > 1 else ""
        text = body if magnitude == 1 and body else f"{magnitude}{body}"
        sign = "-" if c < 0 else "+"
        parts.append(("-" + text if c < 0 else text) if not parts else f" {sign} {text}")
    x = _signed(rng, 0, 6)
    value = sum(c * x**p for p, c in zip(range(degree, -1, -1), coefficients, strict=True))
    return f"Evaluate {''.join(parts)} at x = {x}.", value


def _modpow(rng):
    base, exponent, modulus = rng.randint(2, 20), rng.randint(2, 12), rng.randint(3, 31)
    return f"What is {base}^{exponent} mod {modulus}?", pow(base, exponent, modulus)


def _system(rng):
    x, y = _signed(rng, 0, 12), _signed(rng, 0, 12)
    while True:
        a1, b1, a2, b2 = (_signed(rng, 1, 6) for _ in range(4))
        if a1 * b2 - a2 * b1 != 0:
            break
    first = f"{_linear_side(a1, 'x', 0)} {'+' if b1 > 0 else '-'} {_linear_side(abs(b1), 'y', 0)}"
    second = f"{_linear_side(a2, 'x', 0)} {'+' if b2 > 0 else '-'} {_linear_side(abs(b2), 'y', 0)}"
    ask = rng.choice("xy")
    question = f"If {first} = {a1 * x + b1 * y} and {second} = {a2 * x + b2 * y}, what is {ask}?"
    return question, x if ask == "x" else y


_NAMES = ("Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Juno", "Kofi", "Lena")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "shells")


def _word(rng):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    have, bought, given = rng.randint(5, 90), rng.randint(1, 60), rng.randint(1, 40)
    if rng.random() < 0.5:
        question = (
            f"{name} has {have} {item}, buys {bought} more and gives away {given}. "
            f"How many {item} does {name} have now?"
        )
        return question, have + bought - given
    boxes, per_box = rng.randint(2, 15), rng.randint(2, 24)
    question = f"{name} packs {boxes} boxes with {per_box} {item} each. How many {item} is that in total?"
    return question, boxes * per_box


_GENERATORS: MappingProxyType[str, Callable[[random.Random], tuple[str, Fraction | int]]] = MappingProxyType(
    {
        "add": _add,
        "sub": _sub,
        "mul": _mul,
        "div": _div,
        "remainder": _remainder,
        "expression": _expression,
        "linear": _linear,
        "fraction": _fraction,
        "gcd": _gcd,
        "lcm": _lcm,
        "power": _power,
        "percent": _percent,
        "polynomial": _polynomial,
        "modpow": _modpow,
        "system": _system,
        "word": _word,
    }
)

PROBLEM_KINDS: tuple[str, ...] = tuple(sorted(_GENERATORS))
