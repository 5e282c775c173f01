"""Throwaway SoftHSM2 tokens for tests, benchmarks and demos (one place for the recipe).

SoftHSM2 reads ``SOFTHSM2_CONF`` when the library is initialised (``C_Initialize``), i.e. the
first time this process calls ``pkcs11.lib(path)``. ``init_softhsm_token`` therefore sets the
variable in ``os.environ`` and must run before anything in the process loads the library.
Never use this for production keys: the PINs are whatever the caller passes, the token
directory is wherever the caller points it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
_CANDIDATE_LIBS = (
    DEFAULT_SOFTHSM_LIB,
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHsmUnavailable(RuntimeError):
    """softhsm2-util or libsofthsm2.so is missing, or the token could not be initialised."""


@dataclass(frozen=True)
class SoftHsmToken:
    lib_path: str
    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    conf_path: str
    token_dir: str


def find_softhsm_lib() -> str:
    """Path of libsofthsm2.so (``SOFTHSM2_LIB`` overrides the usual Debian locations)."""
    override = os.environ.get("SOFTHSM2_LIB")
    for candidate in ((override,) if override else ()) + _CANDIDATE_LIBS:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise SoftHsmUnavailable(
        "libsofthsm2.so not found (looked in " + ", ".join(_CANDIDATE_LIBS) + "); install the Debian package softhsm2"
    )


def init_softhsm_token(
    directory: str | os.PathLike[str], label: str, pin: str, so_pin: str, *, for_subprocesses: bool = False
) -> SoftHsmToken:
    """Write ``<directory>/softhsm2.conf`` with its own token directory, point
    ``SOFTHSM2_CONF`` at it and initialise a fresh token ``label`` in the first free slot.

    ``for_subprocesses``: the token is only for other processes (given ``conf_path`` in their
    environment), so this process's ``SOFTHSM2_CONF`` and its loaded library are left alone."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmUnavailable("softhsm2-util not found on PATH; install the Debian package softhsm2")
    lib_path = find_softhsm_lib()

    base = Path(directory).resolve()
    token_dir = base / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(token_dir, 0o700)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {token_dir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )

    previous = os.environ.get("SOFTHSM2_CONF")
    if not for_subprocesses:
        if previous and previous != str(conf):
            _refuse_if_library_already_initialised(lib_path, previous)
        os.environ["SOFTHSM2_CONF"] = str(conf)

    proc = subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SoftHsmUnavailable(
            f"softhsm2-util --init-token for label {label!r} failed (exit {proc.returncode}): "
            + (detail[-1] if detail else "no output")
        )
    return SoftHsmToken(lib_path, label, pin, so_pin, str(conf), str(token_dir))


def _refuse_if_library_already_initialised(lib_path: str, previous_conf: str) -> None:
    try:
        import pkcs11  # lazy import: start-up time (optional/heavy dependency)
    except ImportError:  # pragma: no cover - python-pkcs11 is a hard dependency
        return
    loaded = getattr(pkcs11, "_loaded", {}).get(lib_path)
    if loaded is not None and getattr(loaded, "initialized", False):
        raise SoftHsmUnavailable(
            f"{lib_path} is already initialised in this process with SOFTHSM2_CONF={previous_conf}; "
            "a new token directory would not be seen. Create every SoftHSM token before loading the library."
        )
