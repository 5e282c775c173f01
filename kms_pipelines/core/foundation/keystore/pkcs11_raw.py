"""Bulk DEK rewrap on raw PKCS#11 handles: C_UnwrapKey, C_WrapKey, C_DestroyObject.

python-pkcs11 stays for everything else. For the sweep's inner loop it makes about 15
calls per DEK (after each unwrap it reads ten attributes, some of which SoftHSM2 rejects
one by one, and ``wrap_key`` calls C_WrapKey twice to learn the length); these three
calls are all the work. The binding is cffi in ABI mode: the cryptoki functions are
looked up in the PKCS#11 module python-pkcs11 already loaded (same ``dlopen`` handle, so
the same initialised library and login), nothing is compiled, and a cffi call costs well
under a microsecond against the token's tens. The declarations below are the standard
PKCS#11 (OASIS 2.40/3.0) types and prototypes this path needs, written here.

Return codes are raised as python-pkcs11's exception classes, so the keystore's session
handling (lost sessions, unwrap failures) treats both paths alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pkcs11.exceptions as p11x
from cffi import FFI
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

_ffi = FFI()
_ffi.cdef("""
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_ULONG CK_FLAGS;
typedef struct { CK_ULONG mechanism; void *pParameter; CK_ULONG ulParameterLen; } CK_MECHANISM;
typedef struct { CK_ULONG type; void *pValue; CK_ULONG ulValueLen; } CK_ATTRIBUTE;
CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, void *pApplication, void *Notify, CK_SESSION_HANDLE *phSession);
CK_RV C_CloseSession(CK_SESSION_HANDLE hSession);
CK_RV C_UnwrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hUnwrappingKey,
                  unsigned char *pWrappedKey, CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE *pTemplate,
                  CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE *phKey);
CK_RV C_WrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hWrappingKey,
                CK_OBJECT_HANDLE hKey, unsigned char *pWrappedKey, CK_ULONG *pulWrappedKeyLen);
CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject);
""")

CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
_MAX_WRAPPED = 1024  # an AES key wrapped with padding is its length rounded up to 8, plus 8

_RV = {
    0x30: p11x.DeviceError,
    0x32: p11x.DeviceRemoved,
    0x40: p11x.EncryptedDataInvalid,
    0x41: p11x.EncryptedDataLenRange,
    0x5: p11x.GeneralError,
    0x6: p11x.FunctionFailed,
    0x60: p11x.KeyHandleInvalid,
    0x6A: p11x.KeyUnextractable,
    0x69: p11x.KeyNotWrappable,
    0x82: p11x.ObjectHandleInvalid,
    0xB0: p11x.SessionClosed,
    0xB3: p11x.SessionHandleInvalid,
    0xE0: p11x.TokenNotPresent,
    0x101: p11x.UserNotLoggedIn,
    0x110: p11x.WrappedKeyInvalid,
    0x112: p11x.WrappedKeyLenRange,
    0xF0: p11x.UnwrappingKeyHandleInvalid,
    0x113: p11x.WrappingKeyHandleInvalid,
    0x31: p11x.DeviceMemory,
    0x2: p11x.HostMemory,
}


def _check(rv: int) -> None:
    if rv:
        raise _RV.get(rv, p11x.PKCS11Error)(f"CKR 0x{rv:x}")


class RawRewrap:
    """The three calls on one PKCS#11 module. Callers serialise access (the keystore's library lock)."""

    def __init__(self, lib_path: str):
        # the module python-pkcs11 loaded: same handle, same state. Any: cffi's ABI mode makes the
        # C_* functions attributes at run time, from the cdef above, which no stub can know.
        self._lib: Any = _ffi.dlopen(lib_path)

    def _template(self, attrs: dict[Attribute, bool]) -> tuple[Any, int, list[Any]]:
        """A CK_ATTRIBUTE array (and the buffers it points into) for an unwrap template."""
        keep, arr = [], _ffi.new("CK_ATTRIBUTE[]", len(attrs) + 2)
        items = [(Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.KEY_TYPE, KeyType.AES), *attrs.items()]
        for slot, (attr, value) in zip(arr, items, strict=True):
            buf = (
                _ffi.new("CK_ULONG *", int(value))
                if attr in (Attribute.CLASS, Attribute.KEY_TYPE)
                else _ffi.new("unsigned char *", 1 if value else 0)
            )
            keep.append(buf)
            slot.type, slot.pValue, slot.ulValueLen = int(attr), buf, _ffi.sizeof(_ffi.typeof(buf).item)
        return arr, len(items), keep

    def rewrap(
        self,
        slot_id: int,
        old_kek: int,
        new_kek: int,
        wrapped_deks: Sequence[bytes],
        dek_template: dict[Attribute, bool],
        on_unwrap_error: Callable[[int, Exception], object],
    ) -> list[bytes]:
        """Unwrap each DEK under ``old_kek`` into a session object, wrap it under ``new_kek``,
        destroy it. A DEK that does not unwrap goes to ``on_unwrap_error(index, exc)`` (which raises)."""
        lib = self._lib
        session = _ffi.new("CK_SESSION_HANDLE *")
        _check(lib.C_OpenSession(slot_id, CKF_SERIAL_SESSION | CKF_RW_SESSION, _ffi.NULL, _ffi.NULL, session))
        hs = session[0]
        try:
            mech = _ffi.new("CK_MECHANISM *", {"mechanism": int(Mechanism.AES_KEY_WRAP_PAD)})
            template, count, _keep = self._template(dek_template)
            handle = _ffi.new("CK_OBJECT_HANDLE *")
            out = _ffi.new("unsigned char[]", _MAX_WRAPPED)
            out_len = _ffi.new("CK_ULONG *")
            result = []
            for index, wrapped in enumerate(wrapped_deks):
                wrapped = bytes(wrapped)
                rv = lib.C_UnwrapKey(hs, mech, old_kek, wrapped, len(wrapped), template, count, handle)
                if rv:
                    try:
                        _check(rv)
                    except p11x.PKCS11Error as exc:
                        on_unwrap_error(index, exc)
                        raise
                dek = handle[0]
                try:
                    out_len[0] = _MAX_WRAPPED
                    _check(lib.C_WrapKey(hs, mech, new_kek, dek, out, out_len))
                    result.append(bytes(_ffi.buffer(out, out_len[0])))
                finally:
                    _check(lib.C_DestroyObject(hs, dek))
            return result
        finally:
            lib.C_CloseSession(hs)  # also destroys any session object a failure left behind
