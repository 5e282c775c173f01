"""PKCS#11 keystore (HSM) via python-pkcs11.

Every key is generated inside the token and stays there. Objects are token objects found by
``CKA_ID`` (the ref's UTF-8 bytes); ``CKA_LABEL`` is set to the ref for humans but never used to
look anything up. Data keys (DEKs) exist in the clear only as short-lived *session* objects inside
the token: they are unwrapped, used and destroyed within one call.

Byte formats match the software backend, so data moves between backends:

* ``encrypt``/``dek_encrypt``: AES-256-GCM, ``nonce(12) || ciphertext || tag(16)``;
* wrapped DEKs: RFC 5649 AES key wrap with padding (``CKM_AES_KEY_WRAP_PAD``), which
  ``cryptography``'s ``aes_key_unwrap_with_padding`` opens given the same KEK value.

Concurrency. python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``, which under PKCS#11 tells the
library that the application will *not* call it from several threads at once (SoftHSM2 then
disables its internal mutexes). So every call into a library is serialised by one per-process
lock for that library, and each thread additionally works on its own session taken from a
bounded pool (a python-pkcs11 session must never be used by two threads at once).

Login state in PKCS#11 is per application and token, not per session: one "login session" per
(process, library, token) holds the ``C_Login``; pool sessions are opened without a PIN and
inherit it, so closing a pool session never logs the others out. The login session is closed
(``C_Logout``) when the last keystore on that token in the process is closed.

Processes. Handles do not survive ``fork``. After a fork, the child forgets (never closes) the
handles it inherited, re-initialises the library (``C_Finalize`` + ``C_Initialize`` of the
per-process python-pkcs11 singleton in the child only) and opens its own login and sessions
lazily on first use. The parent is not affected.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x
from pkcs11.mechanisms import GCMParams

from .base import (
    AES_256,
    ALGORITHMS,
    ARCHIVABLE,
    ARCHIVE_KEK,
    ED25519,
    GENERAL,
    PURPOSES,
    DecryptionFailed,
    GeneratedKey,
    KeyExists,
    KeyNotFound,
    KeyStoreError,
    KeyStoreSessionLost,
    NotArchivable,
)
from .pkcs11_raw import RawRewrap
from .software import validate_ref

if TYPE_CHECKING:
    from .pkcs11_raw import RawRewrap

log = logging.getLogger(__name__)

ED25519_EC_PARAMS = b"\x06\x03\x2b\x65\x70"  # DER OID 1.3.101.112 (id-Ed25519)
_NONCE = 12
_TAG = 16

# SoftHSM2 reports a failed GCM tag check or a wrong unwrapping key as CKR_GENERAL_ERROR;
# other tokens use the specific codes. In a decrypt/unwrap step they all mean "does not open".
_DECRYPT_ERRORS = (
    p11x.GeneralError,
    p11x.FunctionFailed,
    p11x.EncryptedDataInvalid,
    p11x.EncryptedDataLenRange,
    p11x.DataInvalid,
    p11x.DataLenRange,
    p11x.MechanismParamInvalid,
)
_UNWRAP_ERRORS = _DECRYPT_ERRORS + (p11x.WrappedKeyInvalid, p11x.WrappedKeyLenRange)
# After these the session (or the whole token connection) is no use any more.
_BROKEN_SESSION_ERRORS = (
    p11x.SessionClosed,
    p11x.SessionHandleInvalid,
    p11x.DeviceRemoved,
    p11x.DeviceError,
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
)

# Attribute sets for the key objects this backend creates.
_NO_USE = {
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
_SESSION_DEK_FOR_WRAPPING = {
    **_NO_USE,
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
}
_SESSION_DEK_FOR_CIPHER = {
    **_NO_USE,
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
}


def _aes_kek_template(extractable: bool) -> dict[Attribute, Any]:
    return {
        **_NO_USE,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.MODIFIABLE: False,
        Attribute.SENSITIVE: not extractable,
        Attribute.EXTRACTABLE: extractable,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: True,
        Attribute.UNWRAP: True,
    }


def _aes_template(extractable: bool, purpose: str) -> dict[Attribute, Any]:
    if purpose == ARCHIVE_KEK:
        # Wraps archivable keys into the vault and unwraps them for forensics; never encrypts data.
        return {
            **_NO_USE,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.MODIFIABLE: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
        }
    if purpose == ARCHIVABLE:
        # CKA_SENSITIVE keeps the value unreadable; CKA_EXTRACTABLE lets C_WrapKey take it out wrapped.
        return {**_aes_kek_template(False), Attribute.EXTRACTABLE: True}
    return _aes_kek_template(extractable)


# A key unwrapped from the vault for forensics: decrypt only, never leaves. SoftHSM2 2.6.1 refuses
# CKA_MODIFIABLE in an unwrap template (CKR_ATTRIBUTE_READ_ONLY), and a modifiable object could be
# switched to CKA_ENCRYPT later: so it is unwrapped as a session object and C_CopyObject'd to the
# token with CKA_MODIFIABLE false, which the copy template may set (true -> false only).
_FORENSIC_TEMPLATE = {
    **_NO_USE,
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.DECRYPT: True,
}
# CKA_ID prefix of forensic objects; '/' never occurs in a live ref, so no live lookup can reach them.
_FORENSIC_ID = b"forensic/"


def _kind(obj: Any) -> str:
    try:
        key_type = obj[Attribute.KEY_TYPE]
    except p11x.PKCS11Error:
        return "an unknown object"
    if key_type == KeyType.AES:
        return AES_256
    if key_type == KeyType.EC_EDWARDS:
        return ED25519
    return getattr(key_type, "name", str(key_type))


def _raw_ed25519_point(ec_point: bytes) -> bytes:
    """CKA_EC_POINT is the DER OCTET STRING of the 32-byte key (some tokens return it bare)."""
    if len(ec_point) == 32:
        return bytes(ec_point)
    if len(ec_point) == 34 and ec_point[0] == 0x04 and ec_point[1] == 0x20:
        return bytes(ec_point[2:])
    raise KeyStoreError(f"token returned an Ed25519 public point of unexpected length {len(ec_point)}")


# --------------------------------------------------------------------------------------------
# Per-process library and token state, shared by every keystore instance in the process.
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _LibState:
    path: str
    lib: Any
    pid: int
    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises calls into the library


@dataclass(eq=False)
class _TokenState:
    lib: _LibState
    token: Any
    label: str
    login_session: Any  # None when another component of this process already holds the login
    pin_digest: bytes
    users: int = 0


_registry_lock = threading.Lock()
_libs: dict[str, _LibState] = {}
_tokens: dict[tuple[int, str, str], _TokenState] = {}
_inherited_lib_paths: set[str] = set()
_instances: weakref.WeakSet[Pkcs11KeyStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Runs in the child right after os.fork(): drop (never close) the parent's handles."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _tokens.clear()
    _inherited_lib_paths.update(getattr(pkcs11, "_loaded", {}).keys())
    for state in _libs.values():
        state.lock = threading.RLock()
    for store in list(_instances):
        store._forget_handles()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lib_state(path: str) -> _LibState:
    """The loaded, initialised library for this process (caller holds _registry_lock)."""
    pid = os.getpid()
    state = _libs.get(path)
    if state is not None and state.pid == pid:
        return state
    if not os.path.isfile(path):
        raise KeyStoreError(f"PKCS#11 library {path} not found (check KMS_PKCS11_LIB)")
    inherited = state is not None or path in _inherited_lib_paths
    try:
        lib = pkcs11.lib(path)  # per-process singleton: returns the already-loaded library if any
        if inherited:
            # Initialised in the parent before fork: PKCS#11 requires a fresh C_Initialize in the child.
            try:
                lib.finalize()
            except p11x.PKCS11Error:
                pass
            lib.initialize()
    except p11x.PKCS11Error as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KeyStoreError(f"PKCS#11 library {path} could not be loaded/initialised: {detail}") from None
    except OSError as exc:
        raise KeyStoreError(f"PKCS#11 library {path} could not be loaded: {exc}") from None
    _inherited_lib_paths.discard(path)
    state = _LibState(path, lib, pid)
    _libs[path] = state
    return state


def _close_sessions(state: _TokenState, sessions: list[Any]) -> None:
    """Close pooled sessions under the library lock; one already gone on the token is fine."""
    with state.lib.lock:
        for session in sessions:
            try:
                session.close()
            except p11x.PKCS11Error:
                pass


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(b"kms-pkcs11-pin|" + pin.encode("utf-8")).digest()


def _acquire_token(path: str, label: str, pin: str) -> _TokenState:
    with _registry_lock:
        key = (os.getpid(), path, label)
        state = _tokens.get(key)
        if state is not None:
            # Already logged in for this process: C_Login cannot re-check the PIN, compare it instead.
            if not hmac.compare_digest(state.pin_digest, _pin_digest(pin)):
                raise KeyStoreError(f"PKCS#11 login to token {label!r} failed: incorrect PIN")
            state.users += 1
            return state
        lib_state = _lib_state(path)
        with lib_state.lock:
            try:
                token = lib_state.lib.get_token(token_label=label)
            except p11x.NoSuchToken:
                try:
                    labels = sorted({t.label for t in lib_state.lib.get_tokens() if t.label})
                except p11x.PKCS11Error:
                    labels = []
                available = ", ".join(repr(x) for x in labels) or "none"
                raise KeyStoreError(
                    f"PKCS#11 token {label!r} not found in {path}; available tokens: {available}"
                ) from None
            except p11x.MultipleTokensReturned:
                raise KeyStoreError(f"more than one PKCS#11 token labelled {label!r} in {path}") from None
            except p11x.PKCS11Error as exc:
                raise KeyStoreError(f"PKCS#11 slot/token listing failed in {path}: {type(exc).__name__}") from None
            try:
                login = token.open(rw=True, user_pin=pin)
            except p11x.UserAlreadyLoggedIn:
                login = None  # another component of this process holds the login; share it
            except p11x.PinIncorrect:
                raise KeyStoreError(f"PKCS#11 login to token {label!r} failed: incorrect PIN") from None
            except p11x.PinLocked:
                raise KeyStoreError(f"PKCS#11 login to token {label!r} failed: the user PIN is locked") from None
            except (p11x.PinLenRange, p11x.PinInvalid):
                raise KeyStoreError(
                    f"PKCS#11 login to token {label!r} failed: PIN has an invalid length/format"
                ) from None
            except p11x.UserPinNotInitialized:
                raise KeyStoreError(
                    f"PKCS#11 login to token {label!r} failed: the user PIN is not initialised"
                ) from None
            except p11x.PKCS11Error as exc:
                raise KeyStoreError(f"PKCS#11 login to token {label!r} failed: {type(exc).__name__}") from None
        state = _TokenState(lib_state, token, label, login, _pin_digest(pin), users=1)
        _tokens[key] = state
        return state


def _release_token(state: _TokenState) -> None:
    with _registry_lock:
        state.users -= 1
        if state.users > 0:
            return
        key = (state.lib.pid, state.lib.path, state.label)
        if _tokens.get(key) is state:
            del _tokens[key]
        if state.login_session is not None and state.lib.pid == os.getpid():
            with state.lib.lock:
                try:
                    state.login_session.close()  # C_Logout + C_CloseSession
                except p11x.PKCS11Error:
                    pass
            state.login_session = None


# --------------------------------------------------------------------------------------------
# The keystore
# --------------------------------------------------------------------------------------------

_HANDLE_CACHE_SIZE = 256


_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _on_a_fresh_session(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Run a read-only/idempotent operation once more, on a fresh session and login, when its
    session was lost (the lost attempt changed nothing on the token)."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except KeyStoreSessionLost as exc:
            log.warning("PKCS#11 %s: session lost (%s); retrying once on a new session", method.__name__, exc.cause)
            return method(self, *args, **kwargs)

    return wrapper


class _Pooled:
    """A pooled session plus its cache of key objects (python-pkcs11 objects are bound to the
    session that found them). C_FindObjects is the slowest step on many tokens, so a cached
    handle is re-checked with one C_GetAttributeValue (CKA_ID/CLASS/KEY_TYPE) instead."""

    __slots__ = ("session", "cache")

    def __init__(self, session: Any):
        self.session = session
        self.cache: OrderedDict[tuple[str, ObjectClass], Any] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class Pkcs11KeyStore:
    backend = "pkcs11"

    def __init__(self, lib_path: str, token_label: str, pin: str, pool_size: int = 4):
        if not lib_path or not token_label:
            raise KeyStoreError("PKCS#11 keystore needs a library path and a token label")
        if not isinstance(pin, str) or not pin:
            raise KeyStoreError("PKCS#11 keystore needs a user PIN")
        if int(pool_size) < 1:
            raise KeyStoreError(f"pool_size must be at least 1, got {pool_size}")
        self.lib_path = lib_path
        self.token_label = token_label
        self.pool_size = int(pool_size)
        self.__pin = pin
        self._forget_handles()
        _instances.add(self)

    def __repr__(self) -> str:  # never shows the PIN
        return (
            f"Pkcs11KeyStore(lib_path={self.lib_path!r}, token_label={self.token_label!r}, pool_size={self.pool_size})"
        )

    # ---- sessions ------------------------------------------------------------------------
    def _forget_handles(self) -> None:
        """Fresh per-process state. Inherited sessions are dropped, never closed: their handles
        belong to the parent's library instance."""
        self._pid = os.getpid()
        self._connect_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[Any] = []
        self._open = 0
        self._token_state: _TokenState | None = None
        self.raw_rewrap = True  # bulk rewrap on raw handles (pkcs11_raw); False: python-pkcs11 objects
        self._raw: tuple[Any, RawRewrap] | None = None

    def _token(self) -> _TokenState:
        if self._pid != os.getpid():  # forked without os.register_at_fork hooks running
            self._forget_handles()
        state = self._token_state
        if state is not None:
            return state
        with self._connect_lock:
            if self._token_state is None:
                self._token_state = _acquire_token(self.lib_path, self.token_label, self.__pin)
            return self._token_state

    def _checkout(self) -> tuple[Any, _TokenState]:
        state = self._token()
        with self._cond:
            while not self._idle and self._open >= self.pool_size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop(), state
            self._open += 1
        try:
            with state.lib.lock:
                # No PIN: the login session already logged the application in for this token.
                return _Pooled(state.token.open(rw=True)), state
        except BaseException as exc:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            if isinstance(exc, p11x.PKCS11Error):
                raise KeyStoreError(
                    f"could not open a session on PKCS#11 token {self.token_label!r}: {type(exc).__name__}"
                ) from None
            raise

    def _checkin(self, session: Any, state: _TokenState, discard: bool) -> None:
        with self._cond:
            current = self._token_state is state and self._pid == os.getpid()
            if current and not discard:
                self._idle.append(session)
                self._cond.notify()
                return
            if current:
                self._open -= 1
            self._cond.notify()
        if state.lib.pid == os.getpid():
            with state.lib.lock:
                try:
                    session.close()  # opened without PIN: closes without logging anyone out
                except p11x.PKCS11Error:
                    pass

    def _reset_token(self, state: _TokenState) -> None:
        """Drop the pool and the login of a token whose sessions were lost; the next
        ``_checkout`` logs in again (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, …)."""
        with self._cond:
            if self._token_state is not state:
                return
            idle, self._idle = self._idle, []
            self._open = 0  # sessions still checked out belong to the old state: closed at check-in
            self._token_state = None
            self._cond.notify_all()
        if state.lib.pid == os.getpid():
            _close_sessions(state, idle)
        _release_token(state)

    @contextmanager
    def _session(self, what: str, ref: str) -> Iterator[Any]:
        """One pooled session, used under the library lock. Maps leftover PKCS#11 errors."""
        session, state = self._checkout()
        discard = False
        try:
            with state.lib.lock:
                yield session
        except KeyStoreError:
            raise
        except _BROKEN_SESSION_ERRORS as exc:
            discard = True
            # Every session of this token may be dead with it (a removed device, a closed
            # login): start over with a fresh login and pool on the next operation.
            self._reset_token(state)
            raise KeyStoreSessionLost(
                f"PKCS#11 {what} for key {ref!r} failed: token/session lost "
                f"({type(exc).__name__}); the next operation opens a new session",
                cause=type(exc).__name__,
            ) from None
        except p11x.KeyUnextractable:
            raise KeyStoreError(f"PKCS#11 {what} for key {ref!r} refused: key is not extractable") from None
        except p11x.PKCS11Error as exc:
            raise KeyStoreError(f"PKCS#11 {what} for key {ref!r} failed: {type(exc).__name__}") from None
        except BaseException:
            discard = True  # e.g. KeyboardInterrupt mid-operation: do not reuse a session in an unknown state
            raise
        finally:
            self._checkin(session, state, discard)

    # ---- lookups (caller holds a session) --------------------------------------------------
    @staticmethod
    def _id(ref: str) -> bytes:
        return validate_ref(ref).encode("utf-8")

    def _objects(self, session: Any, ref: str, attrs: dict[Attribute, Any] | None = None) -> list[Any]:
        template = {Attribute.ID: self._id(ref), Attribute.TOKEN: True}
        template.update(attrs or {})
        return list(session.get_objects(template))

    def _one(self, session: _Pooled, ref: str, object_class: ObjectClass, key_type: KeyType, role: str) -> Any:
        key_id = self._id(ref)
        slot = (ref, object_class)
        cached = session.cache.get(slot)
        if cached is not None:
            try:
                attrs = cached.get_attributes([Attribute.ID, Attribute.CLASS, Attribute.KEY_TYPE])
                if (
                    bytes(attrs[Attribute.ID]) == key_id
                    and attrs[Attribute.CLASS] == object_class
                    and attrs[Attribute.KEY_TYPE] == key_type
                ):
                    session.cache.move_to_end(slot)
                    return cached
            except p11x.PKCS11Error:
                pass  # destroyed meanwhile (here or by another process): look it up again
            session.cache.pop(slot, None)
        found = self._objects(session, ref, {Attribute.CLASS: object_class, Attribute.KEY_TYPE: key_type})
        if len(found) == 1:
            session.cache[slot] = found[0]
            if len(session.cache) > _HANDLE_CACHE_SIZE:
                session.cache.popitem(last=False)
            return found[0]
        if len(found) > 1:
            raise KeyStoreError(f"{len(found)} objects on the token share the id of key {ref!r}; refusing to guess")
        others = self._objects(session, ref)
        if others:
            raise KeyStoreError(f"key {ref!r} is {_kind(others[0])}, not {role}")
        raise KeyNotFound(f"key {ref!r} not found on PKCS#11 token {self.token_label!r}")

    def _aes(self, session: Any, ref: str) -> Any:
        return self._one(session, ref, ObjectClass.SECRET_KEY, KeyType.AES, "an AES-256 key")

    def _private(self, session: Any, ref: str) -> Any:
        return self._one(session, ref, ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS, "a signing key")

    def _public(self, session: Any, ref: str) -> Any:
        return self._one(session, ref, ObjectClass.PUBLIC_KEY, KeyType.EC_EDWARDS, "a signing key")

    @staticmethod
    def _destroy_session_object(obj: Any) -> bool:
        try:
            obj.destroy()
            return True
        except p11x.PKCS11Error:
            return False

    # ---- protocol ------------------------------------------------------------------------
    def generate(self, ref: str, algorithm: str, *, extractable: bool = False, purpose: str = GENERAL) -> GeneratedKey:
        if algorithm not in ALGORITHMS:
            raise KeyStoreError(f"unsupported algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if purpose not in PURPOSES or (purpose != GENERAL and algorithm != AES_256):
            raise KeyStoreError(f"purpose {purpose!r} is not available for {algorithm} keys")
        key_id = self._id(ref)
        with self._session("generate", ref) as s:
            # Atomic within this process (library lock held); PKCS#11 itself does not enforce unique ids.
            if self._objects(s, ref):
                raise KeyExists(f"key {ref!r} already exists on PKCS#11 token {self.token_label!r}")
            if algorithm == AES_256:
                s.generate_key(
                    KeyType.AES,
                    256,
                    id=key_id,
                    label=ref,
                    store=True,
                    template=_aes_template(bool(extractable), purpose),
                )
                return GeneratedKey(ref, algorithm)
            # Ed25519: ``extractable`` never applies to signing keys (as in the software backend).
            params = s.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_EC_PARAMS}, local=True
            )
            public, _private = params.generate_keypair(
                id=key_id,
                label=ref,
                store=True,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.MODIFIABLE: False,
                    Attribute.VERIFY: True,
                    Attribute.ENCRYPT: False,
                    Attribute.WRAP: False,
                    Attribute.DERIVE: False,
                },
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                },
            )
            return GeneratedKey(ref, algorithm, _raw_ed25519_point(public[Attribute.EC_POINT]))

    @_on_a_fresh_session
    def exists(self, ref: str) -> bool:
        with self._session("lookup", ref) as s:
            return bool(self._objects(s, ref))

    @_on_a_fresh_session
    def public_key(self, ref: str) -> bytes:
        with self._session("public-key read", ref) as s:
            return _raw_ed25519_point(self._public(s, ref)[Attribute.EC_POINT])

    @_on_a_fresh_session
    def sign(self, ref: str, message: bytes) -> bytes:
        with self._session("sign", ref) as s:
            return bytes(self._private(s, ref).sign(bytes(message), mechanism=Mechanism.EDDSA))

    @staticmethod
    def _gcm_encrypt(key: Any, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        sealed = key.encrypt(
            bytes(plaintext), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, bytes(aad), _TAG * 8)
        )
        return nonce + bytes(sealed)

    @staticmethod
    def _gcm_decrypt(key: Any, blob: bytes, aad: bytes) -> bytes:
        return bytes(
            key.decrypt(
                bytes(blob[_NONCE:]),
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(bytes(blob[:_NONCE]), bytes(aad), _TAG * 8),
            )
        )

    @_on_a_fresh_session
    def encrypt(self, ref: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        with self._session("encrypt", ref) as s:
            return self._gcm_encrypt(self._aes(s, ref), plaintext, aad)

    @_on_a_fresh_session
    def decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        with self._session("decrypt", ref) as s:
            key = self._aes(s, ref)
            if len(blob) < _NONCE + _TAG:
                raise DecryptionFailed(f"ciphertext does not authenticate under key {ref!r}")
            try:
                return self._gcm_decrypt(key, blob, aad)
            except _DECRYPT_ERRORS:
                raise DecryptionFailed(f"ciphertext does not authenticate under key {ref!r}") from None

    # ---- envelope encryption -----------------------------------------------------------------
    @_on_a_fresh_session
    def new_wrapped_dek(self, kek_ref: str) -> bytes:
        with self._session("DEK wrap", kek_ref) as s:
            kek = self._aes(s, kek_ref)
            dek = s.generate_key(KeyType.AES, 256, store=False, template=_SESSION_DEK_FOR_WRAPPING)
            try:
                return bytes(kek.wrap_key(dek, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            finally:
                self._must_destroy(dek)

    def _must_destroy(self, obj: Any) -> None:
        # A session object that cannot be destroyed would linger in a pooled session: raise so the
        # session is discarded (closing a session destroys its session objects).
        if not self._destroy_session_object(obj):
            raise p11x.SessionHandleInvalid()

    def _unwrap(
        self, kek: Any, kek_ref: str, wrapped: bytes, template: dict[Attribute, Any], which: str = "wrapped DEK"
    ) -> Any:
        try:
            return kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                bytes(wrapped),
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template=template,
            )
        except _UNWRAP_ERRORS:
            raise DecryptionFailed(f"{which} does not unwrap under key {kek_ref!r}") from None

    @_on_a_fresh_session
    def dek_encrypt(self, kek_ref: str, wrapped_dek: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        with self._session("DEK encrypt", kek_ref) as s:
            dek = self._unwrap(self._aes(s, kek_ref), kek_ref, wrapped_dek, _SESSION_DEK_FOR_CIPHER)
            try:
                return self._gcm_encrypt(dek, plaintext, aad)
            finally:
                self._must_destroy(dek)

    @_on_a_fresh_session
    def dek_decrypt(self, kek_ref: str, wrapped_dek: bytes, blob: bytes, aad: bytes = b"") -> bytes:
        with self._session("DEK decrypt", kek_ref) as s:
            dek = self._unwrap(self._aes(s, kek_ref), kek_ref, wrapped_dek, _SESSION_DEK_FOR_CIPHER)
            try:
                if len(blob) < _NONCE + _TAG:
                    raise DecryptionFailed("ciphertext does not authenticate under its DEK")
                try:
                    return self._gcm_decrypt(dek, blob, aad)
                except _DECRYPT_ERRORS:
                    raise DecryptionFailed("ciphertext does not authenticate under its DEK") from None
            finally:
                self._must_destroy(dek)

    @_on_a_fresh_session
    def rewrap(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        if self.raw_rewrap:
            return self._rewrap_raw(old_kek_ref, new_kek_ref, wrapped_deks)
        return self._rewrap_objects(old_kek_ref, new_kek_ref, wrapped_deks)

    def _rewrap_raw(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        """The bulk path: three PKCS#11 calls per DEK on raw handles (``pkcs11_raw``)."""

        def unwrap_failed(index: int, exc: Exception) -> None:
            if isinstance(exc, _UNWRAP_ERRORS):
                raise DecryptionFailed(f"wrapped DEK #{index} does not unwrap under key {old_kek_ref!r}") from None

        with self._session("rewrap", old_kek_ref) as s:
            old, new = self._aes(s, old_kek_ref), self._aes(s, new_kek_ref)
            state = self._token()
            if self._raw is None or self._raw[0] is not state.lib:
                self._raw = (state.lib, RawRewrap(state.lib.path))
            return self._raw[1].rewrap(
                state.token.slot.slot_id, old.handle, new.handle, wrapped_deks, _SESSION_DEK_FOR_WRAPPING, unwrap_failed
            )

    def _rewrap_objects(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        """The python-pkcs11 path (the reference the raw path is tested against)."""
        out: list[bytes] = []
        with self._session("rewrap", old_kek_ref) as s:
            old, new = self._aes(s, old_kek_ref), self._aes(s, new_kek_ref)
            for index, wrapped in enumerate(wrapped_deks):
                dek = self._unwrap(old, old_kek_ref, wrapped, _SESSION_DEK_FOR_WRAPPING, which=f"wrapped DEK #{index}")
                try:
                    out.append(bytes(new.wrap_key(dek, mechanism=Mechanism.AES_KEY_WRAP_PAD)))
                finally:
                    self._must_destroy(dek)
        return out

    # ---- escrow ------------------------------------------------------------------------------
    def export_secret(self, ref: str) -> bytes:
        with self._session("export", ref) as s:
            found = self._objects(s, ref)
            if not found:
                raise KeyNotFound(f"key {ref!r} not found on PKCS#11 token {self.token_label!r}")
            key = next(
                (o for o in found if o.object_class == ObjectClass.SECRET_KEY and o[Attribute.KEY_TYPE] == KeyType.AES),
                None,
            )
            if key is None:
                raise KeyStoreError(
                    f"key {ref!r} is not extractable: it is {_kind(found[0])}, only escrow AES keys export"
                )
            attrs = key.get_attributes([Attribute.EXTRACTABLE, Attribute.SENSITIVE])
            if not attrs.get(Attribute.EXTRACTABLE) or attrs.get(Attribute.SENSITIVE):
                raise KeyStoreError(f"key {ref!r} is not extractable (non-extractable/sensitive in the token)")
            try:
                return bytes(key[Attribute.VALUE])
            except (p11x.AttributeSensitive, p11x.AttributeTypeInvalid):
                raise KeyStoreError(f"key {ref!r} is not extractable (token refused to read its value)") from None

    def import_secret(self, ref: str, value: bytes) -> GeneratedKey:
        if len(value) != 32:
            raise KeyStoreError("imported AES-256 key must be 32 bytes")
        key_id = self._id(ref)
        with self._session("import", ref) as s:
            if self._objects(s, ref):
                raise KeyExists(f"key {ref!r} already exists on PKCS#11 token {self.token_label!r}")
            template = {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.ID: key_id,
                Attribute.LABEL: ref,
                **_aes_kek_template(True),
                Attribute.VALUE: bytes(value),
            }
            try:
                s.create_object(template)
            except p11x.PKCS11Error as exc:
                raise KeyStoreError(f"PKCS#11 import of key {ref!r} failed: {type(exc).__name__}") from None
            finally:
                template.clear()
            return GeneratedKey(ref, AES_256)

    # ---- archive vault (T1) ----------------------------------------------------------------
    def _archive_kek(self, s: Any, kek_ref: str) -> Any:
        kek = self._aes(s, kek_ref)
        attrs = kek.get_attributes([Attribute.WRAP, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.EXTRACTABLE])
        # The archive-KEK template is the only one that wraps but neither encrypts nor decrypts.
        if (
            not attrs[Attribute.WRAP]
            or attrs[Attribute.ENCRYPT]
            or attrs[Attribute.DECRYPT]
            or attrs[Attribute.EXTRACTABLE]
        ):
            raise KeyStoreError(f"key {kek_ref!r} is not an archive KEK")
        return kek

    @_on_a_fresh_session
    def archive_wrap(self, kek_ref: str, ref: str) -> bytes:
        with self._session("archive wrap", ref) as s:
            kek = self._archive_kek(s, kek_ref)
            key = self._aes(s, ref)
            attrs = key.get_attributes([Attribute.EXTRACTABLE, Attribute.SENSITIVE])
            if not attrs[Attribute.EXTRACTABLE] or not attrs[Attribute.SENSITIVE]:
                raise NotArchivable(f"key {ref!r} was not generated archivable; it cannot leave the keystore")
            return bytes(kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))

    @staticmethod
    def _forensic_id(ref: str) -> bytes:
        return _FORENSIC_ID + validate_ref(ref).encode("utf-8")

    def _forensic_objects(self, s: Any, ref: str) -> list[Any]:
        return list(s.get_objects({Attribute.ID: self._forensic_id(ref), Attribute.TOKEN: True}))

    def forensic_unwrap(self, kek_ref: str, wrapped: bytes, ref: str) -> GeneratedKey:
        key_id = self._forensic_id(ref)
        with self._session("forensic import", ref) as s:
            kek = self._archive_kek(s, kek_ref)
            if self._forensic_objects(s, ref):
                raise KeyExists(f"key {ref!r} already exists in the forensic keystore")
            try:
                transient = kek.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    bytes(wrapped),
                    id=key_id,
                    label=f"forensic/{ref}",
                    mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    store=False,
                    template=dict(_FORENSIC_TEMPLATE),
                )
            except _UNWRAP_ERRORS:
                raise DecryptionFailed(f"archived key does not unwrap under archive KEK {kek_ref!r}") from None
            try:
                transient.copy({Attribute.TOKEN: True, Attribute.MODIFIABLE: False})
            finally:
                self._must_destroy(transient)
            return GeneratedKey(ref, AES_256)

    @_on_a_fresh_session
    def forensic_decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        with self._session("forensic decrypt", ref) as s:
            found = [o for o in self._forensic_objects(s, ref) if o.object_class == ObjectClass.SECRET_KEY]
            if not found:
                raise KeyNotFound(f"key {ref!r} not found in the forensic keystore")
            if len(blob) < _NONCE + _TAG:
                raise DecryptionFailed(f"ciphertext does not authenticate under forensic key {ref!r}")
            try:
                return self._gcm_decrypt(found[0], blob, aad)
            except _DECRYPT_ERRORS:
                raise DecryptionFailed(f"ciphertext does not authenticate under forensic key {ref!r}") from None

    def forensic_destroy(self, ref: str) -> None:
        with self._session("forensic destroy", ref) as s:
            found = self._forensic_objects(s, ref)
            if not found:
                raise KeyNotFound(f"key {ref!r} not found in the forensic keystore")
            for obj in found:
                obj.destroy()

    @_on_a_fresh_session
    def forensic_refs(self) -> Iterable[str]:
        with self._session("forensic listing", "*") as s:
            out = set()
            for obj in s.get_objects({Attribute.TOKEN: True, Attribute.CLASS: ObjectClass.SECRET_KEY}):
                try:
                    raw = bytes(obj[Attribute.ID])
                except p11x.PKCS11Error:
                    continue
                if raw.startswith(_FORENSIC_ID):
                    out.add(raw[len(_FORENSIC_ID) :].decode("utf-8", "replace"))
            return sorted(out)

    @_on_a_fresh_session
    def forensic_attributes(self, ref: str) -> dict[str, bool]:
        """What the token lets a forensic object do (tests and `kms archive forensic` show it)."""
        names = {
            "sign": Attribute.SIGN,
            "encrypt": Attribute.ENCRYPT,
            "decrypt": Attribute.DECRYPT,
            "wrap": Attribute.WRAP,
            "unwrap": Attribute.UNWRAP,
            "extractable": Attribute.EXTRACTABLE,
            "sensitive": Attribute.SENSITIVE,
            "modifiable": Attribute.MODIFIABLE,
        }
        with self._session("forensic read", ref) as s:
            found = self._forensic_objects(s, ref)
            if not found:
                raise KeyNotFound(f"key {ref!r} not found in the forensic keystore")
            attrs = found[0].get_attributes(list(names.values()))
            return {k: bool(attrs[a]) for k, a in names.items()}

    # ---- housekeeping ------------------------------------------------------------------------
    def destroy(self, ref: str) -> None:
        with self._session("destroy", ref) as s:
            found = self._objects(s, ref)
            if not found:
                raise KeyNotFound(f"key {ref!r} not found on PKCS#11 token {self.token_label!r}")
            for key in [k for k in s.cache if k[0] == ref]:
                del s.cache[key]
            for obj in found:
                obj.destroy()

    @_on_a_fresh_session
    def refs(self) -> Iterable[str]:
        with self._session("listing", "*") as s:
            out: set[str] = set()
            for obj in s.get_objects({Attribute.TOKEN: True}):
                try:
                    raw = obj[Attribute.ID]
                except p11x.PKCS11Error:
                    continue
                try:
                    out.add(validate_ref(bytes(raw).decode("utf-8")))
                except (UnicodeDecodeError, KeyStoreError):
                    continue  # objects not made by this backend
            return sorted(out)

    def close(self) -> None:
        """Close this keystore's sessions (and log out if it was the last user of the token in
        this process). The keystore reconnects lazily if used again."""
        if self._pid != os.getpid():
            self._forget_handles()
            return
        with self._connect_lock:
            with self._cond:
                idle, self._idle = self._idle, []
                # Sessions checked out right now belong to the old state: _checkin closes them.
                self._open = 0
                state, self._token_state = self._token_state, None
                self._cond.notify_all()
            if state is None:
                return
            _close_sessions(state, idle)
            _release_token(state)

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
