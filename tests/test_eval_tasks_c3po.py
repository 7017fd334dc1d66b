"""`moekit eval-tasks` additions: C3PO end to end, difficulty levels, the cipher language, and the
inputs they refuse."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.cli import main
from moekit.inference.methods.cipher import CipheredProblem, cipher, decipher
from moekit.inference.methods.tasks import LEVELS, problem_level, task_problems
from test_eval_tasks import save_run


@given(st.text(max_size=60))
@settings(max_examples=80, deadline=None)
def test_cipher_is_a_letter_substitution_that_inverts(text):
    coded = cipher(text)
    assert decipher(coded) == text and len(coded) == len(text)
    for plain, code in zip(text, coded, strict=True):
        if plain.isascii() and plain.isalpha():
            assert code.isascii() and code.isalpha() and plain.isupper() == code.isupper()
        else:
            assert code == plain  # digits, spaces, punctuation and non-ASCII stay


def test_cipher_substitutes_most_letters():
    letters = "abcdefghijklmnopqrstuvwxyz"
    coded = cipher(letters)
    assert sorted(coded) == sorted(letters)  # a permutation
    assert sum(a != b for a, b in zip(letters, coded, strict=True)) >= 20
    assert cipher(letters.upper()) == coded.upper()


def test_ciphered_problems_are_parallel_and_checked_after_deciphering():
    plain = task_problems("algebra", 20)
    coded = task_problems("algebra", 20, ciphered=True)
    assert [c.plain for c in coded] == plain
    for problem in coded:
        assert decipher(problem.prompt) == problem.plain.prompt != problem.prompt
        assert problem.answer == problem.plain.answer
        assert problem.check(" " + cipher(f"x = {problem.answer}"))
        assert not problem.check(" 1/999999")
    assert CipheredProblem(plain[0]).text == cipher(plain[0].text)


@pytest.mark.parametrize("task_set", ["arithmetic", "algebra"])
def test_levels_split_the_stream_by_operand_digits(task_set):
    stream = task_problems(task_set, 400)
    for level in (1, 2, 3):
        expected = [p for p in stream if problem_level(p) == level][:4]
        assert len(expected) == 4
        assert task_problems(task_set, 4, level=level) == expected
        for problem in expected:
            digits = max(len(number) for number in re.findall(r"\d+", problem.question))
            assert digits == level
    assert {problem_level(p) for p in stream} <= set(LEVELS)


def test_eval_tasks_c3po_reports_setup_and_optimisation_cost(tmp_path, capsys):
    run = save_run(tmp_path / "run")
    out = tmp_path / "c3po.json"
    args = ["--method", "c3po", "--limit", "2", "--max-new-tokens", "3", "--json", str(out)]
    extra = ["--c3po-unsolved", "--c3po-references", "4", "--c3po-steps", "2", "--level", "2", "--cipher"]
    assert main(["eval-tasks", str(run), *args, *extra]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "c3po" and result["level"] == 2 and result["ciphered"] is True
    assert result["setup"] == {"tried": 4, "kept": 4, "forward_passes": 4}
    # per item: embedding + neighbour loss + 2 NGD steps + final loss, then 3 decoding steps
    assert result["cost"]["backward_passes"] == 2 * 2
    assert result["cost"]["forward_passes"] >= 4 + 2 * (1 + 1 + 2 + 1 + 1)
    for item in result["items"]:
        assert item["neighbour_loss_after"] <= item["neighbour_loss_before"]
    assert "c3po" in capsys.readouterr().out


def test_apply_to_new_reaches_c3po_and_its_generation(tmp_path, monkeypatch):
    """With `--c3po-apply-to-new` the re-mixed pathway routes the generated tokens as well (and
    the neighbours' answer tokens in the loss): on a task whose first new token is always the
    space before the answer, routing only the last prompt token cannot change an answer."""
    from moekit.inference.methods import tasks

    seen = []
    for name in ("c3po", "c3po_generate"):
        original = getattr(tasks, name)

        def record(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs["apply_to_new"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(tasks, name, record)
    run = save_run(tmp_path / "run")
    args = ["--method", "c3po", "--limit", "1", "--max-new-tokens", "2", "--c3po-unsolved"]
    extra = ["--c3po-references", "2", "--c3po-variant", "kernel"]
    assert main(["eval-tasks", str(run), *args, *extra]) == 0
    assert seen == [("c3po", False), ("c3po_generate", False)]
    seen.clear()
    assert main(["eval-tasks", str(run), *args, *extra, "--c3po-apply-to-new"]) == 0
    assert seen == [("c3po", True), ("c3po_generate", True)]


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--method", "c3po", "--c3po-references", "2"], "--c3po-references"),  # nothing solved
        (["--method", "c3po", "--c3po-unsolved", "--c3po-neighbours", "0"], "--c3po-neighbours"),
        (["--method", "c3po", "--c3po-unsolved", "--c3po-layers", "9"], "--c3po-layers"),
        (["--method", "c3po", "--c3po-unsolved", "--c3po-core-experts", "99"], "--c3po-core-experts"),
        (["--method", "c3po", "--c3po-references", "0"], "--c3po-references"),
        (["--method", "steer", "--steer-layers", "7"], "--steer-layers"),
        (["--method", "steer", "--steer-layers", "a"], "--steer-layers"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, extra, field):
    run = save_run(tmp_path / "run")
    assert main(["eval-tasks", str(run), "--limit", "1", "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moekit: error: ") and field in err[0]


def test_an_unknown_level_is_refused_by_the_parser(tmp_path, capsys):
    run = save_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-tasks", str(run), "--level", "9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--level" in err[0]
