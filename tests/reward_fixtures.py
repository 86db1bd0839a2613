"""Reward functions for the run tests, imported by path in the scoring processes."""


def fails_on_odd_length(response: str, problem) -> float:
    """1 for an even-length response; raises on an odd one (a reward with a bug)."""
    if len(response) % 2:
        raise ValueError(f"odd length {len(response)}")
    return 1.0
