"""Evaluators of section P, key purposes and scope (P1-P4): each reads the live state and returns a Finding."""

from __future__ import annotations

from dataclasses import asdict

from sqlalchemy import select

from ..envelope import data_keys as envelope
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, Key, KeyVersion
from ..foundation.db.models_rotation import ServiceSeed
from ..keys import lifecycle, manifest, service_keys
from ..ledger import rpt_verify
from ..response import escrow
from .access import PROBE_CLIENT
from .model import Finding, _finding, _iso

# ---- P: key purposes ---------------------------------------------------------------


def eval_p1(ctx: KmsContext) -> Finding:
    problems, good = [], []
    chain = rpt_verify.verify_chain(ctx)
    if chain.ok:
        good.append(
            f"RPT chain verifies ({chain.head_seq} token(s), head {chain.head_hash[:12]}…"
            + (f", matches {chain.checked_against}" if chain.checked_against else "")
            + ")"
        )
    else:
        problems.append(f"RPT chain broken at seq {chain.first_bad_seq}: {chain.problem}")
    with ctx.transaction() as session:
        root_active = session.scalars(
            select(KeyVersion.version).join(Key).where(Key.name == "root", KeyVersion.state == ACTIVE)
        ).first()
        live_service = set(
            session.execute(
                select(Key.name, KeyVersion.version)
                .join(KeyVersion)
                .where(Key.key_class == "service", KeyVersion.state.in_(("active", "rotated")))
            ).all()
        )
        seeds = session.execute(select(ServiceSeed.key_name, ServiceSeed.key_version, ServiceSeed.root_version)).all()
    stray = [f"{k} v{v} (under root v{rv})" for k, v, rv in seeds if (k, v) in live_service and rv != root_active]
    if stray:
        problems.append(f"service seeds not wrapped under the active root v{root_active}: {', '.join(stray[:5])}")
    else:
        good.append(
            f"{sum((k, v) in live_service for k, v, _ in seeds)} service seed(s) wrapped under root v{root_active}"
        )
    trust = manifest.verify_chain(ctx)
    if trust.ok:
        good.append(f"root manifest chain verifies ({trust.count} manifest(s))")
    else:
        problems.append(f"root manifest chain broken: {trust.problem}")
    return _finding(
        problems,
        good,
        {"rpt_head_seq": chain.head_seq, "rpt_ok": chain.ok, "manifests": trust.count, "seeds": len(seeds)},
    )


def eval_p2(ctx: KmsContext) -> Finding:
    problems, good, per = [], [], {}
    for service in ctx.policy.key_class("service").names or []:
        steps = []
        if not ctx.read_only:  # issuing a probe credential writes; an --at evaluation writes nothing
            cred = service_keys.issue_credential(ctx, service, PROBE_CLIENT)
            check = service_keys.verify_credential(ctx, service, cred)
            steps.append(("credential", bool(check), check.problem))
        blob = service_keys.encrypt_secret(ctx, service, "compliance-probe", b"compliance-probe")
        ok = service_keys.decrypt_secret(ctx, service, "compliance-probe", blob) == b"compliance-probe"
        steps.append(("app secret", ok, None if ok else "decrypted value differs"))
        signed = service_keys.sign_audit_event(ctx, service, {"probe": "compliance", "at": ctx.now().isoformat()})
        vcheck = service_keys.verify_audit_event(ctx, signed)
        steps.append(("audit signature", bool(vcheck), vcheck.problem))
        per[service] = {name: ok for name, ok, _ in steps}
        for name, ok, why in steps:
            if not ok:
                problems.append(f"{service}: {name} round trip failed ({why})")
    if not problems:
        probes = (
            "app-secret and audit-signature (credential probe skipped: read-only --at evaluation)"
            if ctx.read_only
            else "credential, app-secret and audit-signature"
        )
        good.append(f"{probes} round trips pass for {len(per)} service(s)")
    return _finding(problems, good, {"services": per})


def eval_p3(ctx: KmsContext) -> Finding:
    problems, good = [], []
    names = [f"data:{n}" for n in ctx.policy.key_class("data").names or []]
    with ctx.transaction() as session:
        refs = {}
        for name in names:
            v = lifecycle.active_version(lifecycle.get_key(session, name))
            refs[name] = (v.version, v.wrap_ref) if v is not None else (None, None)
    for name, (version, ref) in refs.items():
        if not ref:
            problems.append(f"{name} has no active wrapping version")
            continue
        aad = f"compliance-canary|{name}|v{version}".encode()
        wrapped = ctx.keystore.new_wrapped_dek(ref)
        blob = ctx.keystore.dek_encrypt(ref, wrapped, b"compliance-canary", aad)
        if ctx.keystore.dek_decrypt(ref, wrapped, blob, aad) != b"compliance-canary":
            problems.append(f"{name} v{version}: canary envelope round trip returned other bytes")
    counts = envelope.inventory_counts(ctx)
    orphans = [c for c in counts if c.state == "unknown" and c.deks]
    if orphans:
        problems.append(
            "DEKs wrapped under versions that do not exist: "
            + ", ".join(f"{c.key} v{c.version} ({c.deks})" for c in orphans[:5])
        )
    live = sum(c.deks for c in counts)
    if not problems:
        good.append(
            f"canary envelope round trip passes under {len(refs)} data key(s); DEK inventory: {live} live, "
            f"{sum(c.shredded for c in counts)} shredded, over {len(counts)} key version(s)"
        )
    return _finding(problems, good, {"deks_by_version": [asdict(c) for c in counts]})


def eval_p4(ctx: KmsContext) -> Finding:
    problems = escrow.current_problems(ctx)
    cur = escrow.current_package(ctx)
    good = (
        [
            f"break-glass v{cur.key_version} sealed in package {cur.package_id} "
            f"({cur.threshold} of {len(cur.custodians)}, sealed {_iso(cur.created_at)})"
        ]
        if cur
        else []
    )
    return _finding(list(problems), good, {"package": cur.package_id if cur else None})
