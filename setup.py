"""Only what pyproject.toml cannot say: the C kernel of the ledger verifier, built by cffi
at install time (kms_pipelines/core/ledger/_chain_build.py; README, "Why C in the ledger
verifier")."""

from setuptools import setup

setup(cffi_modules=["kms_pipelines/core/ledger/_chain_build.py:ffibuilder"])
