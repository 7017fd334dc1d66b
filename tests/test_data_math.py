"""Math problems: every stored answer is right (checked by an independent solver), and the checker
accepts exactly the right answers."""

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.build import load_sample
from moekit.data.mathgen import (
    PROBLEM_KINDS,
    accuracy,
    check_answer,
    format_number,
    generate_problem,
    generate_problems,
    parse_number,
    problem_from_text,
)
from moekit.data.splits import split_corpus
from moekit.errors import MoekitError

NUM = r"(-?\d+)"


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _poly_value(poly: str, x: int) -> int:
    total = 0
    for sign, coefficient, var, power in re.findall(
        r"([+-]?)\s*(\d*)(x?)(?:\^(\d+))?", poly.replace(" ", "")
    ):
        if not coefficient and not var:
            continue
        c = int(coefficient) if coefficient else 1
        p = int(power) if power else (1 if var else 0)
        total += (-c if sign == "-" else c) * x**p
    return total


def _linear_coefficients(side: str, variable: str) -> tuple[Fraction, Fraction]:
    """(a, b) of a side 'a·v + b' written as e.g. '-3x - 7', 'x', '-y + 2'."""
    a = b = Fraction(0)
    for sign, number, var in re.findall(rf"([+-]?)\s*(\d*)({variable}?)", side.replace(" ", "")):
        if not number and not var:
            continue
        value = Fraction(int(number) if number else 1) * (-1 if sign == "-" else 1)
        if var:
            a += value
        else:
            b += value
    return a, b


def solve(question: str) -> Fraction:
    """An independent reading of every problem kind, written from the question text alone."""
    rules = [
        (rf"(?:What is|Calculate|Add) {NUM} (?:\+|plus|and) {NUM}[?.]", lambda a, b: a + b),
        (rf"What is {NUM} (?:-|minus) {NUM}\?", lambda a, b: a - b),
        (rf"Subtract {NUM} from {NUM}\.", lambda b, a: a - b),
        (rf"(?:What is|Multiply|What is the product of) {NUM} (?:\*|by|and) {NUM}[?.]", lambda a, b: a * b),
        (rf"(?:What is|Divide) {NUM} (?:/|by) {NUM}[?.]", lambda a, b: Fraction(a, b)),
        (rf"What is the remainder when {NUM} is divided by {NUM}\?", lambda a, b: a % b),
        (rf"What is the greatest common divisor of {NUM} and {NUM}\?", math.gcd),
        (rf"What is the least common multiple of {NUM} and {NUM}\?", math.lcm),
        (rf"What is \(?{NUM}\)?(?:\^| to the power of ){NUM}\?", lambda a, b: a**b),
        (rf"What is {NUM}% of {NUM}\?", lambda p, n: Fraction(p * n, 100)),
        (rf"What is {NUM}\^{NUM} mod {NUM}\?", pow),
    ]
    for pattern, rule in rules:
        match = re.fullmatch(pattern, question)
        if match:
            return Fraction(rule(*map(int, match.groups())))
    term = r"\((\d+) ([-+*]) (\d+)\)"
    if match := re.fullmatch(rf"Evaluate {term} ([-+*]) {term}\.", question):
        a, op1, b, op, c, op2, d = match.groups()
        return Fraction(_apply(_apply(int(a), op1, int(b)), op, _apply(int(c), op2, int(d))))
    if match := re.fullmatch(r"What is (\d+)/(\d+) (\+|-|\*|divided by) (\d+)/(\d+)\?", question):
        p, q, op, r, s = match.groups()
        x, y = Fraction(int(p), int(q)), Fraction(int(r), int(s))
        return {"+": x + y, "-": x - y, "*": x * y, "divided by": x / y}[op]
    if match := re.fullmatch(r"Solve for (\w): (.*) = (-?\d+)\.", question):
        variable, side, c = match.groups()
        a, b = _linear_coefficients(side, variable)
        return (int(c) - b) / a
    if match := re.fullmatch(rf"Evaluate (.*) at x = {NUM}\.", question):
        return Fraction(_poly_value(match.group(1), int(match.group(2))))
    if match := re.fullmatch(rf"If (.*) = {NUM} and (.*) = {NUM}, what is ([xy])\?", question):
        first, c1, second, c2, ask = match.groups()
        (a1, _), (b1, _) = _linear_coefficients(first, "x"), _linear_coefficients(first, "y")
        (a2, _), (b2, _) = _linear_coefficients(second, "x"), _linear_coefficients(second, "y")
        det = a1 * b2 - a2 * b1
        x = (int(c1) * b2 - int(c2) * b1) / det
        y = (a1 * int(c2) - a2 * int(c1)) / det
        return x if ask == "x" else y
    if match := re.fullmatch(r"\w+ has (\d+) \w+, buys (\d+) more and gives away (\d+)\. .*", question):
        a, b, c = map(int, match.groups())
        return Fraction(a + b - c)
    if match := re.fullmatch(r"\w+ packs (\d+) boxes with (\d+) \w+ each\. .*", question):
        return Fraction(int(match.group(1)) * int(match.group(2)))
    raise AssertionError(f"the test's solver cannot read {question!r}")


def test_every_kind_is_generated_and_every_answer_is_right():
    problems = generate_problems(seed=7, count=3000)
    assert {p.kind for p in problems} == set(PROBLEM_KINDS)
    for problem in problems:
        assert parse_number(problem.answer) == solve(problem.question), problem
        assert format_number(solve(problem.question)) == problem.answer  # reduced, canonical form


def test_the_sample_math_documents_have_right_answers_and_rebuild_as_problems():
    splits = split_corpus(load_sample())
    test_problems = splits.math_problems("test")
    assert len(test_problems) == len(splits.documents("test", "math")) > 0
    for problem, doc in zip(test_problems, splits.documents("test", "math"), strict=True):
        assert problem.text == doc.text and problem.prompt.endswith("\nA:")
        assert parse_number(problem.answer) == solve(problem.question)
        assert problem.kind in PROBLEM_KINDS
    assert accuracy(test_problems, [" " + p.answer for p in test_problems]) == 1.0


@given(st.integers(0, 2**32), st.integers(0, 10**6))
def test_a_problem_depends_only_on_seed_and_index(seed, index):
    assert generate_problem(seed, index) == generate_problem(seed, index)
    assert generate_problems(seed, 3, start=index)[0] == generate_problem(seed, index)


@given(st.integers(-(10**6), 10**6), st.integers(1, 1000))
def test_checker_accepts_equivalent_forms_and_rejects_other_numbers(numerator, denominator):
    value = Fraction(numerator, denominator)
    expected = format_number(value)
    assert check_answer(expected, f" {expected}\nQ: What is 1 + 1?\nA: 2")
    assert check_answer(expected, f"x = {numerator}/{denominator}")
    assert check_answer(expected, f"{numerator * 3} / {denominator * 3}.")
    assert not check_answer(expected, format_number(value + Fraction(1, 7)))
    assert not check_answer(expected, "")
    assert not check_answer(expected, f"about {expected}")


def test_checker_reads_decimals_exactly_and_refuses_a_bad_expected_answer():
    assert check_answer("3/4", "0.75") and not check_answer("3/4", "0.7")
    assert check_answer("-5/2", "-2.5") and check_answer("12", "12.0")
    assert not check_answer("1", "1/0")
    with pytest.raises(MoekitError, match="not a number"):
        check_answer("twelve", "12")


def test_problem_from_text_refuses_text_that_is_not_a_problem():
    problem = generate_problem(0, 5)
    assert problem_from_text(problem.text, problem.answer, problem.kind) == problem
    with pytest.raises(MoekitError, match="expected 'Q: ..."):
        problem_from_text("hello", "1")
    with pytest.raises(MoekitError, match="does not end with the answer"):
        problem_from_text(problem.text, problem.answer + "1")
