"""``kms`` sub-commands, one module per area; each exposes ``register(cli)``."""

from importlib import import_module

AREAS = ("access", "envelope", "keys", "ledger", "backup", "response", "compliance", "console", "runtime")


def register_all(cli) -> None:
    for area in AREAS:
        import_module(f"{__name__}.{area}").register(cli)
