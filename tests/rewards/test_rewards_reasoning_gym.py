"""reasoning-gym tasks by name: seeded problems, the dataset's own scorer, the alphabet."""

from __future__ import annotations

import pickle

import pytest

from rlpost.rewards import build_task
from rlpost.rewards.tasks.reasoning_gym import dataset_names


@pytest.fixture(scope="module")
def chain_sum():
    return build_task("reasoning_gym:chain_sum", {"min_terms": 2, "max_terms": 3})


def test_problems_are_seeded(chain_sum):
    a, b, c = (chain_sum.problems(8, seed=s) for s in (0, 0, 1))
    assert [p.prompt for p in a] == [p.prompt for p in b] != [p.prompt for p in c]
    p = a[0]
    assert p.prompt.startswith("State the final answer") and p.answer == str(
        eval(p.meta["entry"]["metadata"]["expression"])
    )


def test_scores_with_the_datasets_scorer(chain_sum):
    p = chain_sum.problems(1, seed=0)[0]
    wrong = str(int(p.answer) + 1)
    cases = {
        p.answer: 1.0,  # the whole stripped response is the answer
        f"  {p.answer}\n": 1.0,
        f"<think>adding</think><answer>{p.answer}</answer>": 1.0,
        f"<answer>{wrong}</answer> {p.answer}": 0.0,  # the tags win
        wrong: 0.0,
        f"{p.answer}.": 1.0,  # chain_sum's scorer tolerates a trailing dot
        "forty": 0.0,
        "<answer></answer>": 0.0,
        "": 0.0,
    }
    assert {r: chain_sum.score(r, p) for r in cases} == cases
    # partial credit is the dataset's call: its scorer rewards a near-miss number
    assert 0.0 < chain_sum.score(f"the sum is {p.answer}", p) < 1.0
    assert chain_sum.demonstration(p, rng=None) == p.answer


def test_every_listed_dataset_is_a_task_name():
    names = dataset_names()
    assert len(names) > 50 and {"chain_sum", "gsm_symbolic", "countdown"} <= set(names)
    for name in ("basic_arithmetic", "gsm_symbolic", "countdown"):
        task = build_task(f"reasoning_gym:{name}", {})
        p = task.problems(2, seed=3)[0]
        assert p.prompt and isinstance(p.answer, str)
        assert task.score(p.answer, p) == 1.0, name


def test_alphabet_is_printable_ascii_and_covers_prompts(chain_sum):
    import string

    assert chain_sum.alphabet == string.printable
    for p in chain_sum.problems(32, seed=0):
        assert set(p.prompt + p.answer) <= set(chain_sum.alphabet)


def test_pickles_for_the_scoring_workers(chain_sum):
    p = chain_sum.problems(1, seed=0)[0]
    copy = pickle.loads(pickle.dumps(chain_sum))
    assert copy == chain_sum and copy.score(p.answer, p) == 1.0
