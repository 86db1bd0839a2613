"""Typed configs and their YAML loader (layer 2: imports only algorithms/, rewards/ and the
leaves). `sections` holds the sections the jobs share, `rl` the RL job's config, `offline`
and `cdpo` the other jobs', `load` the YAML + dotted-override reader, `placement` the
checks of where Ray puts the workers. Checks that need disk or packages live in
`rlpost.jobs.preflight`."""
