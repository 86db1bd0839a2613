"""Scoring off the controller: a pool of scoring processes with per-sample timeouts, and
the sandbox that runs untrusted programs from model outputs."""
