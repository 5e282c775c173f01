"""The Dagster UI behind the console's door: a reverse proxy to dagster-webserver (HTTP with
httpx, GraphQL subscriptions over websockets), only for signed-in principals whose role may
operate runs (policy ``console.pages.dagster``).

The webserver listens on loopback and is started with ``--path-prefix /dagster``, so the
paths it writes into its pages are the console's paths and are passed through unchanged.
Mutations (launching, terminating runs …) are written to the audit chain.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import httpx
import websockets
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.typing import Subprotocol

from ..core.ledger import audit

PREFIX = "/dagster"
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# The console's session cookie is the console's: never forwarded to the webserver.
_DROP_REQUEST = _HOP | {"cookie", "origin", "referer"}


class DagsterProxy:
    METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    def __init__(self, upstream: str, *, ctx, origin: str, authorize, signed):
        u = urlsplit(upstream)
        if u.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the Dagster webserver must listen on loopback, got {upstream!r}")
        self.upstream = f"{u.scheme}://{u.netloc}"
        self.ws_upstream = ("wss" if u.scheme == "https" else "ws") + f"://{u.netloc}"
        self.ctx, self.origin, self.authorize, self.signed = ctx, origin, authorize, signed
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(60.0, connect=5.0))

    async def _user(self, request):
        from .app import Refused

        try:
            return await self.authorize(request)
        except Refused as exc:
            return exc

    async def http(self, request: Request):
        from .app import Refused

        user = await self._user(request)
        if isinstance(user, Refused):
            if user.status == 401 and request.method == "GET":
                return RedirectResponse(f"/login?{self.signed('Sign in to open the Dagster UI.')}", status_code=303)
            return PlainTextResponse(user.message, status_code=user.status)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and origin != self.origin:
                return PlainTextResponse(f"request from another origin ({origin}) refused", status_code=403)
        body = await request.body()
        path = request.url.path
        if not path.startswith(PREFIX):
            path = PREFIX + path
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        headers.append(("x-forwarded-user", user.principal))
        upstream = self.client.build_request(
            request.method, path, params=request.url.query or None, headers=headers, content=body
        )
        try:
            resp = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"the Dagster webserver did not answer: {type(exc).__name__}", status_code=502)
        self._audit_mutation(user.principal, request.method, path, body)
        # Raw bytes with the upstream's Content-Encoding: the browser decodes, the proxy does not.
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=out_headers, background=BackgroundTask(resp.aclose)
        )

    def _audit_mutation(self, principal: str, method: str, path: str, body: bytes) -> None:
        if method != "POST" or not path.rstrip("/").endswith("/graphql"):
            return
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return
        for op in doc if isinstance(doc, list) else [doc]:
            query = str(op.get("query", "")) if isinstance(op, dict) else ""
            if query.lstrip().startswith("mutation"):
                audit.emit(
                    self.ctx,
                    at=self.ctx.now(),
                    operation="dagster.mutation",
                    actor=principal,
                    target_ref=str(op.get("operationName") or "graphql")[:300],
                    outcome="ok",
                    detail={"via": "console"},
                )

    async def websocket(self, ws: WebSocket):
        from .app import Refused

        user = await self._user(ws)
        origin = ws.headers.get("origin")
        if isinstance(user, Refused) or (origin is not None and origin != self.origin):
            await ws.close(code=4401 if isinstance(user, Refused) and user.status == 401 else 4403)
            return
        path = ws.url.path if ws.url.path.startswith(PREFIX) else PREFIX + ws.url.path
        url = self.ws_upstream + path + (f"?{ws.url.query}" if ws.url.query else "")
        offered = ws.headers.get("sec-websocket-protocol", "").split(",")
        protocols = [Subprotocol(p.strip()) for p in offered if p.strip()]
        try:
            upstream = await websockets.connect(
                url,
                subprotocols=protocols or None,
                open_timeout=10,
                additional_headers={"x-forwarded-user": user.principal},
            )
        except (TimeoutError, OSError, websockets.WebSocketException):
            await ws.close(code=1011)
            return
        await ws.accept(subprotocol=upstream.subprotocol)

        async def client_to_upstream():
            try:
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    await upstream.send(msg["text"] if msg.get("text") is not None else msg["bytes"])
            except WebSocketDisconnect:
                pass
            finally:
                await upstream.close()

        async def upstream_to_client():
            try:
                async for message in upstream:
                    if isinstance(message, str):
                        await ws.send_text(message)
                    else:
                        await ws.send_bytes(message)
            except websockets.ConnectionClosed:
                pass
            finally:
                try:
                    await ws.close()
                except RuntimeError:
                    pass  # already closed by the browser

        # A subscription outlives no session: it is cut at the session's absolute limit.
        remaining = max((user.expires_at - self.ctx.now()).total_seconds(), 0.0)
        try:
            await asyncio.wait_for(
                asyncio.gather(client_to_upstream(), upstream_to_client(), return_exceptions=True), timeout=remaining
            )
        except TimeoutError:
            await upstream.close()
            try:
                await ws.close(code=4401)
            except RuntimeError:
                pass
