"""`kms` commands for backup."""

import click  # noqa: F401


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
