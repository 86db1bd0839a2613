"""The error a user can fix: the leaf every layer raises."""


class ConfigError(ValueError):
    """A config problem a user can fix; printed as one line by the CLI."""
