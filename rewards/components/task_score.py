"""The task's own verifier as a reward component: the default reward."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from rlpost.rewards.base import Problem, SampleReward, Task


class TaskScore(SampleReward):
    """The task's own verifier (`Task.score`): the default reward."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, args: Args, task: Task):
        super().__init__(args, task)
        self.task = task
        task.prepare()

    def __call__(self, response: str, problem: Problem) -> float:
        return self.task.score(response, problem)
