"""What a run reports (layer 3): the tracker (console, metrics.jsonl, plots, W&B), metric
sums merged across ranks, the token-weight view."""
