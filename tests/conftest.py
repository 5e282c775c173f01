"""Shared pytest set-up. Fixtures live in tests/fixtures/*, one module per real backend."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.kms",
    "tests.fixtures.softhsm",
    "tests.fixtures.s3",
    "tests.fixtures.smtp",
    "tests.fixtures.dagster_defs",
    "tests.fixtures.faultproxy",
]
