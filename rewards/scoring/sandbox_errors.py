"""The sandbox's refusal, in a module of its own so that sandbox.py and sandbox_cgroup.py
(which sandbox.py imports) can both raise it."""


class SandboxUnavailable(RuntimeError):
    """This machine cannot provide the isolation the sandbox promises."""
