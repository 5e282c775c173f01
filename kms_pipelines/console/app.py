"""``kms console``: the ASGI app (Starlette) that is the one door to the KMS for humans.

Web layer only: every decision is made in core (``console_auth`` for identity, ``access`` and
``approval_requests`` for dual control, ``audit``, ``drills``, ``compliance``, ``lifecycle``).
Core calls are synchronous and run in the thread pool.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..core import compliance
from ..core.access import anomalies, approval_requests, console_auth, enrolment, webauthn
from ..core.access import principals as access
from ..core.backup import drills
from ..core.backup.backups import BackupError
from ..core.foundation.context import KmsContext
from ..core.foundation.policy import CONSOLE_PAGES
from ..core.keys import lifecycle, manual
from ..core.ledger import audit

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "__Host-kms_session"
PAGE_TITLES = {
    "approvals": "Manual operations",
    "principals": "Principals",
    "anomalies": "Audit anomalies",
    "followups": "Drill follow-ups",
    "report": "Compliance report",
    "keys": "Key inventory",
    "dagster": "Dagster UI",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# The compliance report is core's rendering (``kms report --format html``), with its own inline style.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'"
LAUNCHABLE = ("rotate", console_auth.REGISTRATION_OPERATION, "principal-add")


@dataclass
class ConsoleConfig:
    ctx: KmsContext
    origin: str  # the exact origin browsers use, e.g. https://kms.example.com
    dagster_url: str | None = None  # dagster-webserver on loopback, started with --path-prefix /dagster


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(config: ConsoleConfig) -> Starlette:
    ctx = config.ctx
    rp = webauthn.RelyingParty(config.origin)
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    def headers(csp: str = CSP) -> dict:
        return {
            "Content-Security-Policy": csp,
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }

    def render(request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
        return templates.TemplateResponse(
            request, template, {"titles": PAGE_TITLES, **values}, status_code=status, headers=headers()
        )

    def same_origin(request: Request) -> None:
        """State-changing requests come from our own pages (SameSite cookie + Origin + CSRF)."""
        origin = request.headers.get("origin")
        if origin is not None and origin != rp.origin:
            raise Refused(403, f"request from another origin ({origin}) refused")
        if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            raise Refused(403, "cross-site request refused")

    async def signed_in(request: Request, page: str | None = None) -> console_auth.ConsoleUser:
        try:
            user = await run_in_threadpool(console_auth.current_user, ctx, request.cookies.get(SESSION_COOKIE))
        except webauthn.ConsoleDenied as exc:
            raise Refused(401, str(exc)) from None
        if page is not None and not set(user.roles) & set(ctx.policy.console.pages[page]):
            await run_in_threadpool(
                audit.emit,
                ctx,
                at=ctx.now(),
                operation="console.page",
                actor=user.principal,
                target_ref=page,
                outcome="denied",
                detail={"reason": "permission", "roles": user.roles},
            )
            raise Refused(
                403,
                f"{PAGE_TITLES[page]} is open to {', '.join(ctx.policy.console.pages[page])}; "
                f"you hold {', '.join(user.roles)}",
            )
        return user

    async def checked_form(request: Request, user: console_auth.ConsoleUser) -> dict:
        same_origin(request)
        form = dict(await request.form())
        if not _equal(form.get("csrf"), user.csrf):
            raise Refused(403, "missing or wrong CSRF token; reload the page")
        return form

    async def checked_json(request: Request, user: console_auth.ConsoleUser | None) -> dict:
        same_origin(request)
        if user is not None and not _equal(request.headers.get("x-csrf-token"), user.csrf):
            raise Refused(403, "missing or wrong CSRF token; reload the page")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "request body must be a JSON object")
        return body

    def allowed_pages(user) -> list[str]:
        return [
            p
            for p in CONSOLE_PAGES
            if set(user.roles) & set(ctx.policy.console.pages[p]) and (p != "dagster" or config.dagster_url)
        ]

    def page(name: str | None):
        """Decorate a page handler: sign-in (and the page's roles) first; refusals rendered."""

        def wrap(fn: Callable):
            async def endpoint(request: Request):
                user = None
                try:
                    user = await signed_in(request, name)
                    return await fn(request, user)
                except Refused as exc:
                    if exc.status == 401:
                        if request.method == "GET":
                            return RedirectResponse(f"/login?{signed(exc.message)}", status_code=303)
                        return JSONResponse({"error": exc.message}, status_code=401, headers=headers())
                    if request.headers.get("content-type", "").startswith("application/json"):
                        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers())
                    return render(request, "refused.html", exc.status, message=exc.message, user=None)
                except ValueError as exc:  # core refusals (AccessDenied, LifecycleError, …): nothing changed
                    return _json_or_page(request, render, exc, user)

            return endpoint

        return wrap

    notice_key = secrets.token_bytes(32)  # per process: a notice outlives no restart

    def signed(message: str) -> str:
        """Query string carrying a notice this console wrote (others' links cannot put text on its pages)."""
        message = message[:300]
        tag = hmac.new(notice_key, message.encode(), hashlib.sha256).hexdigest()[:32]
        return f"m={_quote(message)}&t={tag}"

    def notice(request: Request) -> str | None:
        message, tag = request.query_params.get("m"), request.query_params.get("t") or ""
        if not message:
            return None
        good = hmac.new(notice_key, message.encode(), hashlib.sha256).hexdigest()[:32]
        return message if hmac.compare_digest(tag.encode(), good.encode()) else None

    def done(request: Request, where: str, message: str) -> RedirectResponse:
        return RedirectResponse(f"{where}?{signed(message)}", status_code=303)

    def action(operation: str, user, target: str | None, detail: dict | None = None) -> None:
        audit.emit(
            ctx,
            at=ctx.now(),
            operation=operation,
            actor=user.principal,
            target_ref=target,
            outcome="ok",
            detail=detail or {},
        )

    # ---------------------------------------------------------------- sign-in
    async def login_page(request: Request):
        return render(request, "login.html", message=notice(request), user=None)

    async def login_begin(request: Request):
        try:
            await checked_json(request, None)
        except Refused as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        handle, options = await run_in_threadpool(console_auth.begin_signin, ctx, rp)
        return JSONResponse({"handle": handle, "options": options}, headers=headers())

    async def login_complete(request: Request):
        try:
            body = await checked_json(request, None)
        except Refused as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        try:
            grant = await run_in_threadpool(
                lambda: console_auth.complete_signin(
                    ctx,
                    rp,
                    name=str(body.get("name", "")),
                    handle=str(body.get("handle", "")),
                    response=body.get("credential") or {},
                    totp=str(body.get("totp", "")),
                )
            )
        except access.AccessDenied as exc:
            return JSONResponse({"error": f"sign-in refused: {exc}"}, status_code=401, headers=headers())
        resp = JSONResponse({"message": f"Signed in as {grant.principal}.", "next": "/"}, headers=headers())
        resp.set_cookie(SESSION_COOKIE, grant.token, secure=True, httponly=True, samesite="strict", path="/")
        return resp

    async def logout(request: Request):
        try:
            user = await signed_in(request)
            await checked_form(request, user)
        except Refused:
            return RedirectResponse("/login", status_code=303)
        await run_in_threadpool(console_auth.end_session, ctx, request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse(f"/login?{signed('Signed out.')}", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict", path="/")
        return resp

    # ---------------------------------------------------------------- registration
    async def register_page(request: Request):
        token = request.path_params["token"]
        try:
            principal = await run_in_threadpool(console_auth.registration_link, ctx, token)
        except access.AccessDenied as exc:
            return render(request, "refused.html", 404, message=str(exc), user=None)
        return render(request, "register.html", principal=principal, token=token, user=None)

    async def register_begin(request: Request):
        try:
            await checked_json(request, None)
            handle, options = await run_in_threadpool(
                console_auth.begin_registration, ctx, rp, request.path_params["token"]
            )
        except Refused as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except access.AccessDenied as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"handle": handle, "options": options}, headers=headers())

    async def register_complete(request: Request):
        try:
            body = await checked_json(request, None)
            name = await run_in_threadpool(
                lambda: console_auth.complete_registration(
                    ctx,
                    rp,
                    request.path_params["token"],
                    handle=str(body.get("handle", "")),
                    response=body.get("credential") or {},
                    totp=str(body.get("totp", "")),
                )
            )
        except Refused as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except access.AccessDenied as exc:
            return JSONResponse({"error": f"registration refused: {exc}"}, status_code=400)
        return JSONResponse(
            {
                "message": f"Security key registered for {name}. Sign in now.",
                "next": f"/login?{signed('Security key registered; sign in.')}",
            }
        )

    # ---------------------------------------------------------------- pages
    @page(None)
    async def home(request, user):
        return render(request, "home.html", user=user, pages=allowed_pages(user), message=notice(request))

    @page("approvals")
    async def approvals_page(request, user):
        rows = await run_in_threadpool(approval_requests.pending, ctx)
        keys = await run_in_threadpool(lambda: sorted({r.key for r in lifecycle.inventory(ctx)}))
        return render(
            request,
            "approvals.html",
            user=user,
            pages=allowed_pages(user),
            rows=rows,
            keys=keys,
            can_request="rotate" in access.role_permissions(ctx, user.roles),
            launchable=LAUNCHABLE,
            message=notice(request),
        )

    @page("approvals")
    async def request_rotation(request, user):
        form = await checked_form(request, user)
        key, ticket = form.get("key", "").strip(), form.get("ticket", "").strip()

        def run():
            lifecycle.validate_key_name(ctx, key)
            access.require_permission(ctx, user.principal, "rotate", target=key)
            return access.request_approval(ctx, operation="rotate", target=key, ticket=ticket, requester=user.principal)

        try:
            rid = await run_in_threadpool(run)
        except lifecycle.LifecycleError as exc:
            raise access.AccessDenied(str(exc), reason="invalid") from None
        return done(
            request,
            "/approvals",
            f"Request {rid}: manual rotation of {key} under {ticket} awaits "
            f"{ctx.policy.access.approvals_required} approvals.",
        )

    async def pending_binding(request, action_name: str):
        rid = int(request.path_params["rid"])
        r = await run_in_threadpool(approval_requests.get_pending, ctx, rid)
        if action_name == "approve":  # the binding access.approve checks
            return r, webauthn.approval_binding(r.operation, r.target, r.ticket)
        return r, webauthn.step_up_binding(action_name, r.operation, r.target, r.ticket)

    @page("approvals")
    async def step_up_begin(request, user):
        body = await checked_json(request, user)
        act = body.get("action")
        if act not in ("approve", "launch"):
            raise Refused(400, "action must be approve or launch")
        r, binding = await pending_binding(request, act)
        if act == "approve" and r.operation == console_auth.REGISTRATION_OPERATION and r.target == user.principal:
            raise Refused(403, "you may not approve the registration of your own security key")
        handle, options = await run_in_threadpool(webauthn.begin_step_up, ctx, rp, user.principal, binding)
        return JSONResponse({"handle": handle, "options": options}, headers=headers())

    @page("approvals")
    async def approve(request, user):
        body = await checked_json(request, user)
        rid = int(request.path_params["rid"])
        r = await run_in_threadpool(approval_requests.get_pending, ctx, rid)

        def run():  # core checks the assertion (bound to this request's operation, target, ticket) and TOTP
            return access.approve(
                ctx,
                user.principal,
                ticket=r.ticket,
                operation=r.operation,
                totp=str(body.get("totp", "")),
                target=r.target,
                assertion={"handle": str(body.get("handle", "")), "credential": body.get("credential") or {}},
            )

        info = await run_in_threadpool(run)
        return JSONResponse(
            {
                "message": f"Approved {info.operation} of {info.target} under {info.ticket} "
                f"({info.have}/{info.required}).",
                "next": "/approvals",
            }
        )

    @page("approvals")
    async def launch(request, user):
        body = await checked_json(request, user)
        r, binding = await pending_binding(request, "launch")
        if r.operation not in LAUNCHABLE:
            raise Refused(400, f"{r.operation} is launched from the CLI; the console launches {', '.join(LAUNCHABLE)}")
        if r.requester != user.principal:
            raise Refused(403, f"only the requester {r.requester} launches request {r.id}")

        def run():
            console_auth.verify_step_up(
                ctx,
                rp,
                user.principal,
                binding,
                handle=str(body.get("handle", "")),
                response=body.get("credential") or {},
            )
            if r.operation == "principal-add":  # target NAME=ROLE,...; the TOTP URI is shown once, here
                name, _, roles = r.target.partition("=")
                e = enrolment.enroll_principal(
                    ctx,
                    name,
                    roles.split(","),
                    requested_by=user.principal,
                    totp=str(body.get("totp", "")),
                    ticket=r.ticket,
                )
                return {
                    "message": f"Enrolled {e.name} ({', '.join(e.roles)}). Hand {e.name} the TOTP URI below "
                    f"(shown once); next, request {e.name}'s security-key registration link "
                    f"(Principals page): approvals need the key.",
                    "link": e.provisioning_uri,
                }
            if r.operation == "rotate":
                o = manual.manual_rotate(
                    ctx.as_actor(user.principal),
                    r.target,
                    ticket=r.ticket,
                    requested_by=user.principal,
                    totp=str(body.get("totp", "")),
                )
                return {
                    "message": f"Rotated {r.target}: v{o.result.old_version} -> v{o.result.new_version}, "
                    f"approved by {', '.join(o.approvers)}.",
                    "next": "/keys",
                }
            link = console_auth.issue_registration_link(ctx, r.target, ticket=r.ticket, requested_by=user.principal)
            return {
                "message": f"Registration link for {r.target} (approved by {', '.join(link.approvers)}), valid "
                f"until {link.expires_at:%Y-%m-%d %H:%M} UTC. Shown once: hand it to {r.target}.",
                "link": link.url(rp.origin),
            }

        return JSONResponse(await run_in_threadpool(run))

    @page("approvals")
    async def reject(request, user):
        form = await checked_form(request, user)
        rid = int(request.path_params["rid"])
        r = await run_in_threadpool(
            lambda: approval_requests.reject(ctx, rid, principal=user.principal, note=form.get("note", ""))
        )
        return done(request, "/approvals", f"Rejected request {r.id} ({r.operation} of {r.target}).")

    @page("principals")
    async def principals_page(request, user):
        rows = await run_in_threadpool(access.list_principals, ctx)
        creds = await run_in_threadpool(console_auth.credentials_by_principal, ctx)
        return render(
            request,
            "principals.html",
            user=user,
            pages=allowed_pages(user),
            rows=rows,
            creds=creds,
            roles=ctx.policy.access.roles,
            message=notice(request),
        )

    @page("principals")
    async def request_registration(request, user):
        form = await checked_form(request, user)
        name, ticket = form.get("principal", "").strip(), form.get("ticket", "").strip()
        rid = await run_in_threadpool(
            lambda: console_auth.request_registration(ctx, name, ticket=ticket, requested_by=user.principal)
        )
        return done(
            request,
            "/approvals",
            f"Request {rid}: registration link for {name} awaits {ctx.policy.access.approvals_required} approvals.",
        )

    @page("principals")
    async def request_enrolment(request, user):
        """Enrolment is the manual operation principal-add (target NAME=ROLE,...): two other
        principals holding 'principals' approve it on the Manual operations page, then the
        requester launches it there with their key and TOTP code."""
        form = await checked_form(request, user)
        name, ticket = form.get("name", "").strip(), form.get("ticket", "").strip()
        roles = [r for r in (await request.form()).getlist("roles") if r]

        rid = await run_in_threadpool(
            lambda: enrolment.request_enrolment(ctx, name, roles, ticket=ticket, requester=user.principal)
        )
        return done(
            request,
            "/approvals",
            f"Request {rid}: enrolment of {name} awaits {ctx.policy.access.approvals_required} approvals.",
        )

    @page("anomalies")
    async def anomalies_page(request, user):
        rows = await run_in_threadpool(anomalies.list_anomalies, ctx)
        return render(
            request,
            "anomalies.html",
            user=user,
            pages=allowed_pages(user),
            rows=rows,
            review=set(ctx.policy.audit.review_severities),
            message=notice(request),
        )

    @page("anomalies")
    async def review(request, user):
        form = await checked_form(request, user)
        aid = int(request.path_params["aid"])
        try:
            row = await run_in_threadpool(
                lambda: anomalies.review(ctx, aid, user.principal, form.get("note") or None, totp=form.get("totp", ""))
            )
        except audit.AuditError as exc:
            raise access.AccessDenied(str(exc), reason="invalid") from None
        return done(request, "/anomalies", f"Anomaly {row.id} ({row.kind}) reviewed.")

    @page("followups")
    async def followups_page(request, user):
        rows = await run_in_threadpool(drills.list_drills, ctx)
        return render(
            request,
            "followups.html",
            user=user,
            pages=allowed_pages(user),
            drills=rows,
            now=ctx.now(),
            message=notice(request),
        )

    @page("followups")
    async def close_followup(request, user):
        form = await checked_form(request, user)
        fid = int(request.path_params["fid"])
        try:
            out = await run_in_threadpool(
                lambda: drills.close_followup(ctx, fid, actor=user.principal, resolution=form.get("resolution", ""))
            )
        except BackupError as exc:
            await run_in_threadpool(
                audit.emit,
                ctx,
                at=ctx.now(),
                operation="drill.followup.close",
                actor=user.principal,
                target_ref=f"followup:{fid}",
                outcome="denied",
                detail={"reason": "invalid", "problem": str(exc)},
            )
            raise access.AccessDenied(str(exc), reason="invalid") from None
        await run_in_threadpool(
            action, "drill.followup.close", user, f"followup:{fid}", {"late": out["late"], "title": out["title"]}
        )
        return done(request, "/followups", f"Follow-up {fid} closed" + (" (late)." if out["late"] else "."))

    @page("report")
    async def report_page(request, user):
        html = await run_in_threadpool(lambda: compliance.render_html(compliance.build_report(ctx)))
        await run_in_threadpool(action, "console.report", user, "compliance-report")
        return HTMLResponse(html, headers=headers(REPORT_CSP))

    @page("keys")
    async def keys_page(request, user):
        rows = await run_in_threadpool(lifecycle.inventory, ctx)
        return render(request, "keys.html", user=user, pages=allowed_pages(user), rows=rows)

    routes = [
        Route("/", home),
        Route("/login", login_page),
        Route("/login/begin", login_begin, methods=["POST"]),
        Route("/login/complete", login_complete, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/register/{token}", register_page),
        Route("/register/{token}/begin", register_begin, methods=["POST"]),
        Route("/register/{token}/complete", register_complete, methods=["POST"]),
        Route("/approvals", approvals_page),
        Route("/approvals/rotation", request_rotation, methods=["POST"]),
        Route("/approvals/{rid:int}/step-up", step_up_begin, methods=["POST"]),
        Route("/approvals/{rid:int}/approve", approve, methods=["POST"]),
        Route("/approvals/{rid:int}/launch", launch, methods=["POST"]),
        Route("/approvals/{rid:int}/reject", reject, methods=["POST"]),
        Route("/principals", principals_page),
        Route("/principals/registration", request_registration, methods=["POST"]),
        Route("/principals/enrolment", request_enrolment, methods=["POST"]),
        Route("/anomalies", anomalies_page),
        Route("/anomalies/{aid:int}/review", review, methods=["POST"]),
        Route("/followups", followups_page),
        Route("/followups/{fid:int}/close", close_followup, methods=["POST"]),
        Route("/report", report_page),
        Route("/keys", keys_page),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    if config.dagster_url:
        from .proxy import DagsterProxy

        proxy = DagsterProxy(
            config.dagster_url, ctx=ctx, origin=rp.origin, authorize=lambda r: signed_in(r, "dagster"), signed=signed
        )
        routes += [
            WebSocketRoute("/dagster/{path:path}", proxy.websocket),
            Route("/dagster", proxy.http, methods=proxy.METHODS),
            Route("/dagster/{path:path}", proxy.http, methods=proxy.METHODS),
        ]
    app = Starlette(routes=routes)
    app.state.config = config
    return app


def _equal(a: Any, b: str) -> bool:
    return isinstance(a, str) and bool(a) and hmac.compare_digest(a.encode(), b.encode())


def _quote(text: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(text[:300])


def _json_or_page(request: Request, render, exc: Exception, user) -> Response:
    if request.headers.get("content-type", "").startswith("application/json"):
        return JSONResponse({"error": str(exc)}, status_code=400)
    return render(request, "refused.html", 400, message=str(exc), user=user)


def app_from_env() -> Starlette:
    """For ``uvicorn --factory kms_pipelines.console.app:app_from_env`` (KMS_CONSOLE_ORIGIN, KMS_CONSOLE_DAGSTER_URL)."""
    import os

    from ..core.runtime.wiring import context_from_env

    origin = os.environ.get("KMS_CONSOLE_ORIGIN")
    if not origin:
        raise SystemExit("KMS_CONSOLE_ORIGIN is not set (the console's exact origin, e.g. https://kms.example.com)")
    return create_app(ConsoleConfig(context_from_env(), origin, os.environ.get("KMS_CONSOLE_DAGSTER_URL") or None))
