"""PKCS#11 (SoftHSM2) keystore throughput against the software keystore, in the same run.

Prints one JSON line per workload:
  {"name", "n", "seconds", "rate", "baseline_rate", "ratio", "peak_rss_mb"}
baseline = the software backend doing the same work; ratio = pkcs11 rate / software rate.

    .venv/bin/python benchmarks/bench_keystore.py [--n 2000]

Sets up its own throwaway SoftHSM2 token (kms_pipelines.core.foundation.keystore.softhsm_setup), so it
must run in a fresh process (SOFTHSM2_CONF is read when the library is first initialised).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kms_pipelines.core.foundation.keystore import AES_256, ED25519  # noqa: E402
from kms_pipelines.core.foundation.keystore.softhsm_setup import init_softhsm_token  # noqa: E402
from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore  # noqa: E402


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _workloads(store, n: int, rewrap_batch: int):
    kek, kek2, sig = (
        f"bench-kek-{secrets.token_hex(4)}",
        f"bench-kek2-{secrets.token_hex(4)}",
        f"bench-sig-{secrets.token_hex(4)}",
    )
    store.generate(kek, AES_256)
    store.generate(kek2, AES_256)
    store.generate(sig, ED25519)
    wrapped_one = store.new_wrapped_dek(kek)
    blob = store.dek_encrypt(kek, wrapped_one, b"x" * 64, b"aad")
    message = b"m" * 128
    state: dict = {}

    def wrap():
        state["wrapped"] = [store.new_wrapped_dek(kek) for _ in range(n)]

    def unwrap_decrypt():
        for _ in range(n):
            store.dek_decrypt(kek, wrapped_one, blob, b"aad")

    def rewrap():
        src = state["wrapped"]
        for i in range(0, len(src), rewrap_batch):
            store.rewrap(kek, kek2, src[i : i + rewrap_batch])

    def sign():
        for _ in range(n):
            store.sign(sig, message)

    return [
        ("keystore.wrap_new_dek", wrap),
        ("keystore.unwrap_decrypt", unwrap_decrypt),
        ("keystore.rewrap", rewrap),
        ("keystore.sign_ed25519", sign),
    ]


def _rewrap_vs_raw_calls(hsm, n: int, batch: int, repeat: int) -> None:
    """``Pkcs11KeyStore.rewrap`` (raw-handle path) against the three PKCS#11 calls alone
    (C_UnwrapKey, C_WrapKey into a preallocated buffer, C_DestroyObject) on the same
    handles, interleaved; python-pkcs11's object path is recorded beside them."""
    from benchmarks.harness import interleaved, load_average, result
    from kms_pipelines.core.foundation.keystore.pkcs11 import _SESSION_DEK_FOR_WRAPPING
    from kms_pipelines.core.foundation.keystore.pkcs11_raw import RawRewrap

    old, new = f"bench-rw-{secrets.token_hex(4)}", f"bench-rw2-{secrets.token_hex(4)}"
    hsm.generate(old, AES_256)
    hsm.generate(new, AES_256)
    wrapped = [hsm.new_wrapped_dek(old) for _ in range(n)]
    state = hsm._token()
    with hsm._session("bench", old) as s:
        h_old, h_new = hsm._aes(s, old).handle, hsm._aes(s, new).handle
    raw = RawRewrap(state.lib.path)

    def ours():
        for i in range(0, n, batch):
            hsm.rewrap(old, new, wrapped[i : i + batch])

    def three_calls():
        with state.lib.lock:
            for i in range(0, n, batch):
                raw.rewrap(
                    state.token.slot.slot_id,
                    h_old,
                    h_new,
                    wrapped[i : i + batch],
                    _SESSION_DEK_FOR_WRAPPING,
                    lambda index, exc: None,
                )

    seconds, raw_seconds, runs = interleaved(ours, three_calls, repeat)
    hsm.raw_rewrap = False
    objects_seconds = _timed(ours)
    hsm.raw_rewrap = True
    print(
        json.dumps(
            result(
                "keystore.rewrap_pkcs11_vs_raw_calls",
                n,
                seconds,
                raw_seconds,
                batch=batch,
                baseline="C_UnwrapKey + C_WrapKey (preallocated) + C_DestroyObject on raw handles",
                python_pkcs11_rate=round(n / objects_seconds, 1),
                load_avg=load_average(),
                **runs,
            )
        ),
        flush=True,
    )


def _scaling_worker(lib_path, label, pin, old, new, wrapped, batch, start_at):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(lib_path, label, pin)
    try:
        store.rewrap(old, new, wrapped[:1])  # log in and find the keys before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for i in range(0, len(wrapped), batch):
            store.rewrap(old, new, wrapped[i : i + batch])
        return time.perf_counter() - t0
    finally:
        store.close()


def _rewrap_scaling(token, hsm, n: int, batch: int, processes: int) -> None:
    """The raw-handle rewrap of n DEKs by 1 process and shared by ``processes`` (the sweep's shards)."""
    import multiprocessing

    from benchmarks.harness import load_average

    old, new = f"bench-sc-{secrets.token_hex(4)}", f"bench-sc2-{secrets.token_hex(4)}"
    hsm.generate(old, AES_256)
    hsm.generate(new, AES_256)
    wrapped = [hsm.new_wrapped_dek(old) for _ in range(n)]
    rates = {}
    ctx = multiprocessing.get_context("spawn")
    for procs in (1, processes):
        share = -(-n // procs)
        start_at = time.time() + 3.0
        with ctx.Pool(procs) as pool:
            seconds = pool.starmap(
                _scaling_worker,
                [
                    (
                        token.lib_path,
                        token.label,
                        token.pin,
                        old,
                        new,
                        wrapped[i * share : (i + 1) * share],
                        batch,
                        start_at,
                    )
                    for i in range(procs)
                ],
            )
        rates[procs] = n / max(seconds)
    print(
        json.dumps(
            {
                "name": "keystore.rewrap_pkcs11_scaling",
                "n": n,
                "processes": processes,
                "rate_1_process": round(rates[1], 1),
                f"rate_{processes}_processes": round(rates[processes], 1),
                "speedup": round(rates[processes] / rates[1], 3),
                "cpus": os.cpu_count(),
                "load_avg": load_average(),
            }
        ),
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="operations per workload (default 2000)")
    parser.add_argument("--rewrap-batch", type=int, default=500, help="DEKs per rewrap call (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs for the rewrap vs raw calls")
    parser.add_argument("--processes", type=int, default=2, help="processes sharing a rewrap (scaling record)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        token = init_softhsm_token(Path(tmp) / "softhsm", "kms-bench", "1234", "5678")
        from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

        software = SoftwareKeyStore(Path(tmp) / "keys", secrets.token_bytes(32))
        hsm = Pkcs11KeyStore(token.lib_path, token.label, token.pin)
        try:
            baseline = dict((name, _timed(fn)) for name, fn in _workloads(software, args.n, args.rewrap_batch))
            for name, fn in _workloads(hsm, args.n, args.rewrap_batch):
                seconds = _timed(fn)
                rate = args.n / seconds
                base_rate = args.n / baseline[name]
                print(
                    json.dumps(
                        {
                            "name": name,
                            "n": args.n,
                            "seconds": round(seconds, 4),
                            "rate": round(rate, 1),
                            "baseline_rate": round(base_rate, 1),
                            "ratio": round(rate / base_rate, 4),
                            "peak_rss_mb": _peak_rss_mb(),
                        }
                    ),
                    flush=True,
                )
            _rewrap_vs_raw_calls(hsm, args.n, args.rewrap_batch, args.repeat)
            if args.processes > 1:
                _rewrap_scaling(token, hsm, args.n, args.rewrap_batch, args.processes)
        finally:
            hsm.close()
            software.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
