"""The product's software FIDO2 authenticator (``kms_pipelines/fido2_client.py``) for tests
that run without a browser (core, CLI and compliance tests); the browser tests use
Chromium's virtual authenticator instead."""

from __future__ import annotations

from kms_pipelines.fido2_client import SoftwareAuthenticator

__all__ = ["SoftAuthenticator", "register"]

SoftAuthenticator = SoftwareAuthenticator


def register(kms, rp, token: str, totp_code: str, authenticator: SoftwareAuthenticator) -> str:
    """Register ``authenticator`` through registration link ``token`` (the console's core path)."""
    from kms_pipelines.core.access import console_auth

    handle, options = console_auth.begin_registration(kms, rp, token)
    return console_auth.complete_registration(
        kms, rp, token, handle=handle, response=authenticator.create(options), totp=totp_code
    )
