"""The top of core: what puts the sections together.

wiring (context_from_env, audited_keystore), nightly (steps, run_nightly: imports every area
that registers a nightly step), simulate (a year of policy in a minute), errors (known_errors,
fault_line: the one-line errors of the CLI and the Dagster layer).
"""
