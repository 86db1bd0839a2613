"""One module per command (layer 5): the RL loop, the offline jobs, the cDPO pipeline and its
stage records, and what they share (preflight checks, the run directory, the controller side
of an update)."""
