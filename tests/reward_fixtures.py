"""Reward functions for the run tests, imported by path in the scoring processes."""


def fails_on_odd_length(response: str, problem) -> float:
    """1 for an even-length response; raises on an odd one (a reward with a bug)."""
    if len(response) % 2:
        raise ValueError(f"odd length {len(response)}")
    return 1.0


def chain_step_fraction(response, problem):
    """The fraction of a chain problem's operands that the response adds in a well-formed step
    with the right tag (the arithmetic aside): a graded reward that a barely warmed-up tiny
    model already spreads over its samples."""
    from rlpost.rewards.tasks.chain import SHORT, TAGS

    operands = problem.meta["operands"]
    steps = [m for m in SHORT.finditer(response)]
    right = sum(
        1
        for i, d in enumerate(operands)
        if i < len(steps) and steps[i][1] == TAGS[i] and int(steps[i][3]) == d
    )
    return right / len(operands)
