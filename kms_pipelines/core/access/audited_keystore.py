"""A KeyStore wrapper that audits every operation (A3) and, when the context carries a
workload identity, checks its short-lived token before each one (A2).

Every ``KmsContext`` built by ``context_from_env``, ``KmsResource`` and the test
``make_kms`` holds one of these around the real backend. ``KmsContext.__post_init__``
re-binds it to each context copy (``as_actor``, a per-run clock), so an event carries
that context's actor and time; the wrapped backend, its sessions and caches are shared.

Audited: generate, sign, encrypt, decrypt, wrap (new_wrapped_dek), dek_encrypt,
dek_decrypt, rewrap, export, import, destroy. Passed through unaudited: ``exists``,
``refs``, ``public_key`` (public metadata), ``close``. An event names the operation, the
key *reference* and the outcome; never values, plaintext, wrapped bytes or tokens.
Events go through ``audit.emit`` (batched, off the caller's transaction; see core/ledger/audit.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..foundation.keystore.base import GeneratedKey, KeyStoreError
from ..ledger import audit
from .refusals import AccessDenied

# keystore method -> the audit operation name (the audit vocabulary of docs/architecture.md)
AUDIT_NAMES = {
    "generate": "generate",
    "sign": "sign",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
    "new_wrapped_dek": "wrap",
    "dek_encrypt": "encrypt",
    "dek_decrypt": "decrypt",
    "rewrap": "rewrap",
    "export_secret": "export",
    "import_secret": "import",
    "destroy": "destroy",
    # archive vault (T1): an archive copy is a wrap; opening one and importing it into the
    # forensic keystore is the dual-controlled manual operation archive-retrieve
    "archive_wrap": "wrap",
    "archive_open": "archive-retrieve",
    "forensic_unwrap": "archive-retrieve",
    "forensic_decrypt": "decrypt",
    "forensic_destroy": "destroy",
}


class AuditedKeyStore:
    """Audit + workload-token enforcement around any KeyStore backend."""

    _inner: Any  # any KeyStore backend (foundation/keystore)
    _credentials: Any  # tokens.WorkloadIdentity / StaticToken (``authorize``), or None
    _ctx: Any  # the KmsContext whose actor and clock each event carries

    def __init__(self, inner: Any, *, credentials: Any = None, context: Any = None):
        if isinstance(inner, AuditedKeyStore):
            credentials = credentials if credentials is not None else inner._credentials
            inner = inner._inner
        self._inner = inner
        self._credentials = credentials
        self._ctx = context

    # ---- wiring ------------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        return self._inner

    @property
    def credentials(self) -> Any:
        return self._credentials

    @property
    def backend(self) -> str:
        return self._inner.backend

    def bind_context(self, ctx: Any) -> AuditedKeyStore:
        """The same wrapper, auditing with ``ctx``'s actor, clock and database."""
        if ctx is self._ctx:
            return self
        return AuditedKeyStore(self._inner, credentials=self._credentials, context=ctx)

    def with_credentials(self, credentials: Any) -> AuditedKeyStore:
        return AuditedKeyStore(self._inner, credentials=credentials, context=self._ctx)

    def __getattr__(self, name: str) -> Any:  # backend-specific extras (directory, pool size …)
        if name.startswith("__") or name in ("_inner", "_credentials", "_ctx"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"AuditedKeyStore({self._inner!r})"

    # ---- the check-and-audit path ---------------------------------------------------------
    def _run(self, method: str, ref: str, fn, detail: dict | None = None):
        ctx = self._ctx
        if ctx is None:  # not bound to a context: nothing to audit against
            return fn()
        operation = AUDIT_NAMES[method]
        actor = ctx.actor
        if self._credentials is not None:
            try:
                claims = self._credentials.authorize(ctx, operation, ref)
                actor = claims.sub
                detail = {**(detail or {}), "jti": claims.jti, "via": ctx.actor}
            except AccessDenied as exc:
                audit.emit(
                    ctx,
                    at=ctx.now(),
                    operation=operation,
                    actor=getattr(exc, "principal", None) or actor,
                    target_ref=ref,
                    outcome="denied",
                    detail={**(detail or {}), "reason": exc.reason, "problem": str(exc)},
                )
                raise
        try:
            result = fn()
        except KeyStoreError as exc:
            audit.emit(
                ctx,
                at=ctx.now(),
                operation=operation,
                actor=actor,
                target_ref=ref,
                outcome="error",
                detail={**(detail or {}), "error": type(exc).__name__},
            )
            raise
        audit.emit(ctx, at=ctx.now(), operation=operation, actor=actor, target_ref=ref, outcome="ok", detail=detail)
        return result

    # ---- protocol ---------------------------------------------------------------------
    def generate(
        self, ref: str, algorithm: str, *, extractable: bool = False, purpose: str = "general"
    ) -> GeneratedKey:
        if purpose == "general":  # backends written before the archive vault take no purpose
            call = lambda: self._inner.generate(ref, algorithm, extractable=extractable)  # noqa: E731
        else:
            call = lambda: self._inner.generate(ref, algorithm, extractable=extractable, purpose=purpose)  # noqa: E731
        return self._run(
            "generate",
            ref,
            call,
            {
                "algorithm": algorithm,
                "extractable": bool(extractable),
                **({"purpose": purpose} if purpose != "general" else {}),
            },
        )

    def exists(self, ref: str) -> bool:
        return self._inner.exists(ref)

    def public_key(self, ref: str) -> bytes:
        return self._inner.public_key(ref)

    def sign(self, ref: str, message: bytes) -> bytes:
        return self._run("sign", ref, lambda: self._inner.sign(ref, message))

    def encrypt(self, ref: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        return self._run("encrypt", ref, lambda: self._inner.encrypt(ref, plaintext, aad))

    def decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        return self._run("decrypt", ref, lambda: self._inner.decrypt(ref, blob, aad))

    def new_wrapped_dek(self, kek_ref: str) -> bytes:
        return self._run("new_wrapped_dek", kek_ref, lambda: self._inner.new_wrapped_dek(kek_ref))

    def dek_encrypt(self, kek_ref: str, wrapped_dek: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        return self._run(
            "dek_encrypt", kek_ref, lambda: self._inner.dek_encrypt(kek_ref, wrapped_dek, plaintext, aad), {"dek": True}
        )

    def dek_decrypt(self, kek_ref: str, wrapped_dek: bytes, blob: bytes, aad: bytes = b"") -> bytes:
        return self._run(
            "dek_decrypt", kek_ref, lambda: self._inner.dek_decrypt(kek_ref, wrapped_dek, blob, aad), {"dek": True}
        )

    def rewrap(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        return self._run(
            "rewrap",
            old_kek_ref,
            lambda: self._inner.rewrap(old_kek_ref, new_kek_ref, wrapped_deks),
            {"to": new_kek_ref, "count": len(wrapped_deks)},
        )

    def export_secret(self, ref: str) -> bytes:
        return self._run("export_secret", ref, lambda: self._inner.export_secret(ref))

    def import_secret(self, ref: str, value: bytes) -> GeneratedKey:
        return self._run("import_secret", ref, lambda: self._inner.import_secret(ref, value))

    def destroy(self, ref: str) -> None:
        return self._run("destroy", ref, lambda: self._inner.destroy(ref))

    def archive_wrap(self, kek_ref: str, ref: str) -> bytes:
        return self._run(
            "archive_wrap", ref, lambda: self._inner.archive_wrap(kek_ref, ref), {"archive": True, "kek": kek_ref}
        )

    def archive_open(self, kek_ref: str, wrapped_dek: bytes, blob: bytes, aad: bytes) -> bytes:
        """``dek_decrypt`` of an archive copy's sealed payload, audited as part of archive-retrieve."""
        return self._run(
            "archive_open", kek_ref, lambda: self._inner.dek_decrypt(kek_ref, wrapped_dek, blob, aad), {"archive": True}
        )

    def forensic_unwrap(self, kek_ref: str, wrapped: bytes, ref: str) -> GeneratedKey:
        return self._run(
            "forensic_unwrap",
            ref,
            lambda: self._inner.forensic_unwrap(kek_ref, wrapped, ref),
            {"forensic": True, "kek": kek_ref},
        )

    def forensic_decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        return self._run(
            "forensic_decrypt", ref, lambda: self._inner.forensic_decrypt(ref, blob, aad), {"forensic": True}
        )

    def forensic_destroy(self, ref: str) -> None:
        return self._run("forensic_destroy", ref, lambda: self._inner.forensic_destroy(ref), {"forensic": True})

    def forensic_refs(self):
        return self._inner.forensic_refs()

    def refs(self):
        return self._inner.refs()

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> AuditedKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unwrap(keystore: Any) -> Any:
    """The backend under any audit wrapper."""
    return keystore.inner if isinstance(keystore, AuditedKeyStore) else keystore
