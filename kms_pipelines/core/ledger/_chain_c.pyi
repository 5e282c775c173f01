"""Types of the C kernel cffi builds from _chain_build.py (the parts ledger_copy uses)."""

from typing import Literal

class _Chain:  # kms_chain *
    expected_seq: int
    count: int
    seq: int
    python_only: int
    status: int
    prev_len: int
    prev: _CharArray

class _CharArray: ...  # char[256]

class _Pointer:  # char * into a buffer (ffi.from_buffer)
    def __add__(self, offset: int) -> _Pointer: ...
    def __enter__(self) -> _Pointer: ...
    def __exit__(self, *exc: object) -> None: ...

class _Buffer:
    def __getitem__(self, index: slice) -> bytes: ...

class _Lib:
    KMS_OK: int
    KMS_GAP: int
    KMS_LINK: int
    KMS_ALTERED: int
    KMS_DEFER: int
    KMS_PREV_MAX: int
    def kms_chain_row(self, st: _Chain, row: bytes, len: int, /) -> int: ...
    def kms_chain_feed(self, st: _Chain, buf: _Pointer, len: int, /) -> int: ...

class _FFI:
    def new(self, cdecl: Literal["kms_chain *"], /) -> _Chain: ...
    def memmove(self, dest: _CharArray, src: bytes, n: int, /) -> None: ...
    def buffer(self, cdata: _CharArray, size: int, /) -> _Buffer: ...
    def from_buffer(self, python_buffer: bytearray, /) -> _Pointer: ...

ffi: _FFI
lib: _Lib
