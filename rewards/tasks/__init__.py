"""The built-in tasks (one file each); `rlpost.rewards.TASKS` names them."""
