"""The FastAPI app and the uvicorn process that serves it.

Pages: ``/`` (enter a name), ``/task`` (the labelling or comparison page). JSON API under
``/api``: ``session`` (claim a name, get a session secret), ``state`` (the annotator's item at a
position of their own queue, their own answer to it and their progress), ``answer`` (store one
answer, durable before the reply), ``image/<name>`` (the task's own files only). Nothing returns
another annotator's answers or the comparison key. Off loopback every request needs the token
(``?token=`` once, then a cookie; or ``Authorization: Bearer``); on loopback the Host header must be
a loopback name, so a web page elsewhere cannot reach the server through DNS rebinding.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tn_ray.labeling.security import TOKEN_COOKIE, UnsafePath, needs_token, resolve_image, token_ok
from tn_ray.labeling.store import AnswerStore, Forbidden
from tn_ray.labeling.tasks import LABELS, Task

STATIC = Path(__file__).parent / "static"
Choice = Literal["set1", "tie", "set2"]


class SessionIn(BaseModel):
    name: str = Field(..., description="annotator name as typed on the first page")
    secret: str | None = Field(None, description="session secret returned when the name was first claimed")


class Comparison(BaseModel):
    alignment: Choice = Field(..., description="which set matches the prompt better")
    quality: Choice = Field(..., description="which set has the better images")


class AnswerIn(BaseModel):
    pos: int = Field(..., ge=0, description="position in the annotator's own queue")
    label: Literal["good", "bad", "skip"] | None = Field(None, description="labelling task: the label")
    comparison: Comparison | None = Field(None, description="comparison task: the two choices")


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def add_token_guard(app: FastAPI, token: str | None) -> None:
    """The access rule of every request (:mod:`tn_ray.labeling.security`): with a ``token``, it must
    come as ``?token=`` (then kept in an HttpOnly cookie: a GET redirects to the same address without
    it), the cookie, or ``Authorization: Bearer``; every response gets :data:`SECURITY_HEADERS`."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
            auth = request.headers.get("authorization", "")
            if auth.startswith("Bearer "):
                given = auth[len("Bearer "):]
            if not token_ok(given, token):
                return JSONResponse({"detail": "token required: open the address the server printed"}, status_code=401)
            if "token" in request.query_params and request.method == "GET":
                query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


def task_routes(task: Task, store: AnswerStore) -> APIRouter:
    """The pages and the JSON API of one task: each annotator sees only their own queue and answers."""
    router = APIRouter()

    def annotator(name: str | None, secret: str | None) -> str:
        try:
            store.check(name or "", secret)
        except Forbidden as err:
            raise HTTPException(403, str(err)) from None
        return name

    def state(name: str, pos: int | None) -> dict:
        seq = store.sequence(name)
        if pos is None or pos >= len(seq):
            nxt = store.assign_next(name)
            seq = store.sequence(name)
            pos = seq.index(nxt) if nxt is not None else len(seq)
        out = {"pos": pos, "length": len(seq), "finished": pos >= len(seq), "item": None, "answer": None,
               "progress": store.progress(name), "kind": task.kind}
        if pos < len(seq):
            item_id = seq[pos]
            out["item"] = task.public(store.index[item_id])
            answer = store.own_answers(name).get(item_id)
            if answer is not None and task.kind == "label":
                answer = {v: k for k, v in LABELS.items()}[answer]
            out["answer"] = answer
        return out

    @router.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @router.get("/task")
    def task_page():
        return FileResponse(STATIC / f"{task.kind}.html")

    @router.get("/api/info")
    def info():
        return {"kind": task.kind, "items": len(task.items), "per_item": store.per_item}

    @router.post("/api/session")
    def session(body: SessionIn):
        try:
            secret, created = store.login(body.name, body.secret)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        except Forbidden as err:
            raise HTTPException(403, str(err)) from None
        return {"name": body.name, "secret": secret, "created": created}

    @router.get("/api/state")
    def get_state(pos: int | None = None, x_annotator: str | None = Header(None), x_session: str | None = Header(None)):
        name = annotator(x_annotator, x_session)
        return state(name, None if pos is None else max(pos, 0))

    @router.post("/api/answer")
    def post_answer(body: AnswerIn, x_annotator: str | None = Header(None), x_session: str | None = Header(None)):
        name = annotator(x_annotator, x_session)
        seq = store.sequence(name)
        if body.pos >= len(seq):
            raise HTTPException(409, f"position {body.pos} is not in your queue ({len(seq)} items)")
        if task.kind == "label":
            if body.label is None:
                raise HTTPException(422, "a labelling answer needs 'label': good, bad or skip")
            value = LABELS[body.label]
        else:
            if body.comparison is None:
                raise HTTPException(422, "a comparison answer needs 'comparison': {alignment, quality}")
            value = body.comparison.model_dump()
        store.answer(name, seq[body.pos], value)
        return state(name, body.pos + 1)

    @router.get("/api/image/{name:path}")
    def image(name: str):
        try:
            path = resolve_image(task.files, name)
        except UnsafePath as err:
            raise HTTPException(400, str(err)) from None
        except KeyError:
            raise HTTPException(404, "no such image in this task") from None
        return FileResponse(path)

    return router


def create_app(task: Task, store: AnswerStore, token: str | None = None, loopback: bool = True) -> FastAPI:
    """The app: the token guard, on loopback a Host check (no DNS rebinding), the task's routes, static files."""
    app = FastAPI(title="tn-ray labelling", docs_url=None, redoc_url=None, openapi_url=None)
    add_token_guard(app, token)
    if loopback:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    app.include_router(task_routes(task, store))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(task: Task, store: AnswerStore, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Bind (port 0 = any free port), print the address once, serve until killed."""
    import uvicorn

    if needs_token(host) and not token:
        raise ValueError(f"binding to {host} needs a token")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    print(f"tn-ray label: serving {task.kind} task ({len(task.items)} items, {store.per_item} annotators each) "
          f"at {url}  answers: {store.path}", flush=True)
    sys.stdout.flush()
    app = create_app(task, store, token=token if needs_token(host) else None, loopback=not needs_token(host))
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
