import ast
import operator
import re

import pytest

from async_rl.tasks import arith

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def independent_eval(expression: str) -> int:
    """Python's own parser and precedence, not the task's solver."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        assert isinstance(node, ast.Constant)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


SPEC = arith.ArithSpec(min_digits=1, max_digits=4, min_terms=2, max_terms=5, ops=("+", "-", "*"))


def test_ground_truths_match_an_independent_evaluation():
    rows = arith.make_rows(SPEC, 500, seed=7, split="train")
    assert len(rows) == 500
    for row in rows:
        expression = row["extra_info"]["expression"]
        assert row["reward_model"]["ground_truth"] == str(independent_eval(expression))


def test_worked_solution_steps_are_correct_and_end_in_the_boxed_answer():
    for problem in [p for _, p in zip(range(300), arith.problems(SPEC, seed=1, split="sft"))]:
        solution = problem.solution()
        assert solution.startswith("<think>\n") and "</think>\n" in solution
        assert solution.endswith(f"\\boxed{{{problem.answer}}}")
        for left, op, right, result in re.findall(r"(-?\d+)([+*-])(\d+) = (-?\d+)", solution):
            assert independent_eval(f"({left}){op}{right}") == int(result)
        assert len(re.findall(" = ", solution)) == len(problem.ops)


def test_streams_are_reproducible_and_splits_differ():
    a = arith.make_rows(SPEC, 50, seed=3, split="train")
    b = arith.make_rows(SPEC, 50, seed=3, split="train")
    c = arith.make_rows(SPEC, 50, seed=3, split="heldout")
    assert a == b
    assert [r["extra_info"]["expression"] for r in a] != [r["extra_info"]["expression"] for r in c]


def test_difficulty_knobs_bound_operands_and_terms():
    spec = arith.ArithSpec(min_digits=3, max_digits=3, min_terms=4, max_terms=4, ops=("*",))
    for _, problem in zip(range(100), arith.problems(spec, seed=0, split="x")):
        assert len(problem.operands) == 4
        assert all(100 <= v <= 999 for v in problem.operands)
        assert set(problem.ops) == {"*"}


def test_exclusion_gives_disjoint_splits_and_small_specs_terminate():
    train = arith.make_rows(SPEC, 200, seed=0, split="train")
    seen = {r["extra_info"]["expression"] for r in train}
    heldout = arith.make_rows(SPEC, 100, seed=0, split="heldout", exclude=seen)
    assert not seen & {r["extra_info"]["expression"] for r in heldout}
    tiny = arith.ArithSpec(min_digits=1, max_digits=1, min_terms=2, max_terms=2, ops=("+",))
    assert len(arith.make_rows(tiny, 1000, seed=0, split="train")) == 100  # 10 x 10 distinct sums


def test_row_format_is_verl_style():
    row = arith.make_rows(SPEC, 1, seed=0, split="train", system_prompt="Be brief.", with_solution=True)[0]
    assert row["data_source"] == "synthetic/arith"
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert row["prompt"][1]["role"] == "user" and "\\boxed{}" in row["prompt"][1]["content"]
    assert row["reward_model"]["style"] == "rule"
    assert row["response"].endswith("}")


def boxed(response: str) -> int:
    return int(response.rsplit("\\boxed{", 1)[1].rstrip("}"))


def test_slipped_solutions_misread_every_minus_and_box_the_misread_answer():
    problem = arith.Problem((7, 3, 2), ("-", "+"))
    slipped = problem.solution(slip=True)
    assert slipped.startswith("<think>\n7+3 = 10\n10+2 = 12\n")
    assert boxed(slipped) == 12 and problem.answer == 6
    assert problem.solution(slip=False) == problem.solution()


def test_the_slip_rate_is_the_share_of_minus_problems_slipped_and_is_reproducible():
    spec = arith.ArithSpec(1, 2, 2, 3, ("+", "-"))
    rows = arith.make_rows(spec, 2000, seed=0, split="sft", with_solution=True, slip_rate=0.6)
    minus = [r for r in rows if "-" in r["extra_info"]["expression"]]
    plus_only = [r for r in rows if "-" not in r["extra_info"]["expression"]]
    share = sum(r["extra_info"]["slipped"] for r in minus) / len(minus)
    assert 0.56 < share < 0.64
    assert not any(r["extra_info"]["slipped"] for r in plus_only)
    # A slipped row's boxed answer is wrong unless the minus operands were all 0.
    wrong = [boxed(r["response"]) != int(r["reward_model"]["ground_truth"]) for r in minus if r["extra_info"]["slipped"]]
    assert sum(wrong) / len(wrong) > 0.9
    again = arith.make_rows(spec, 2000, seed=0, split="sft", with_solution=True, slip_rate=0.6)
    assert [r["response"] for r in again] == [r["response"] for r in rows]


def test_slip_rate_zero_gives_only_correct_solutions_and_out_of_range_is_refused():
    rows = arith.make_rows(SPEC, 300, seed=0, split="sft", with_solution=True)
    assert all(boxed(r["response"]) == int(r["reward_model"]["ground_truth"]) for r in rows)
    with pytest.raises(ValueError, match="slip_rate=1.5"):
        arith.make_rows(SPEC, 3, seed=0, split="sft", with_solution=True, slip_rate=1.5)
