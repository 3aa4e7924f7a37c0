"""The pairwise user study's web page (gradio) and its server, over :class:`hgdpo.study.store.Study`.

A rater logs in once (``/study/login``: their name and the study's password, or the personal password the
organiser gave them) or opens their personal link (``/study/enter?key=...``), then sees the prompt and two
images and answers "Which image looks more natural?" with one click: Left, Right or Tie (keys ← → ↓).

Who votes is decided on the server only: the login starts a session (a random cookie the server maps to the
rater id), gradio learns the rater from it (``auth_dependency``), and the vote events take nothing from the
page but the id of the pair shown, which must be the rater's current pair. New rater ids are capped. Raters
never see results: ``/study/results`` and ``/study/votes.csv`` exist only with an organiser password (HTTP
basic auth, any user name).

The study's own routes serve only the images registered in the study, by their random token, as PNG pixels
only (PNG text, EXIF, XMP, ICC and every other ancillary chunk dropped; JPEG, WebP and BMP decoded and
re-encoded losslessly). Every response carries ``X-Content-Type-Options: nosniff`` and may not be framed. gradio is
imported lazily: it is the optional ``app`` extra.
"""

import base64
import binascii
import html
import io
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from hgdpo.fileio import IMAGE_SUFFIXES
from hgdpo.study.store import Choice, Shown, Study, check_rater, format_results

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI, Request, Response

__all__ = ["QUESTION", "Access", "Gate", "build_app", "image_pixels_only", "import_gradio", "serve"]

QUESTION = "Which image looks more natural?"
MISSING_GRADIO = (
    'The user-study app needs gradio: pip install ".[app]" (in the hgdpo checkout) or pip install "gradio>=6"'
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})  # everything else is metadata
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
SESSION_COOKIE = "hgdpo-study-session"
MAX_FORM_BYTES = 4096
MAX_SESSIONS = 10_000  # the oldest session is dropped beyond this (that rater logs in again)
DEFAULT_MAX_RATERS = 100
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"frame-ancestors 'none'"), (b"referrer-policy", b"no-referrer"))
VOTE_BUTTONS: tuple[tuple[Choice, str, str], ...] = (
    ("left", "← Left", "ArrowLeft"), ("tie", "↓ Tie", "ArrowDown"), ("right", "Right →", "ArrowRight"))
CSS = """
.study-prompt {font-size: 1.15rem; text-align: center; margin: 0.25rem 0 0.75rem}
.study-pair {display: flex; gap: 1rem; justify-content: center}
.study-pair figure {flex: 1; margin: 0; text-align: center}
.study-pair img {display: block; width: 100%; height: auto; max-height: max(240px, 100vh - 330px);
                 object-fit: contain; margin: 0 auto}
#study-progress {text-align: center}
"""
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>HG-DPO user study</title><style>body {{font-family: system-ui, sans-serif; max-width: 26rem; margin: 4rem auto;
padding: 0 1rem}} label, input, button {{display: block; width: 100%; margin: 0.4rem 0; font-size: 1rem}}
.error {{color: #b00020}}</style></head>
<body><h2>{question}</h2><p>{hint}</p><p class="error" role="alert">{error}</p>
<form method="post" action="login"><label>Your name (your rater id)
<input name="name" autocomplete="username" required maxlength="64" autofocus></label>{password}
<button type="submit">Start</button></form></body></html>
"""
PASSWORD_FIELD = ('<label>Password <input name="password" type="password" autocomplete="current-password" required>'
                  "</label>")


def shortcut_script() -> str:
    """A <head> script clicking the vote buttons on ← → ↓ (not while typing, not on key repeat)."""
    keys = ", ".join(f'{key}: "vote-{choice}"' for choice, _, key in VOTE_BUTTONS)
    return f"""<script>
document.addEventListener("keydown", (event) => {{
  if (event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.target.closest && event.target.closest("input, textarea, select, [contenteditable]")) return;
  const button = document.getElementById({{{keys}}}[event.key]);
  if (button && button.offsetParent !== null && !button.disabled) {{ event.preventDefault(); button.click(); }}
}});
</script>"""


def import_gradio() -> Any:
    """The gradio module (with its usage analytics off), or an error naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(MISSING_GRADIO, name="gradio") from error
    return gradio


# ---- what raters are sent -----------------------------------------------------------------------


def _png_pixel_chunks(data: bytes) -> bytes:
    """PNG bytes with only the chunks that make the pixels (no text, EXIF, XMP, ICC, time or other metadata)."""
    kept, offset = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        end = offset + 12 + int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + 8] in PNG_PIXEL_CHUNKS:
            kept.append(data[offset:end])
        offset = end
    return b"".join(kept)


def image_pixels_only(data: bytes) -> bytes:
    """An image as PNG bytes carrying its pixels and nothing else (the metadata could name the model).

    A PNG keeps its pixel chunks as they are; a JPEG, WebP or BMP is decoded (its EXIF orientation applied) and
    re-encoded as lossless PNG. Raises ``ValueError`` for bytes that are neither.
    """
    if data.startswith(PNG_SIGNATURE):
        return _png_pixel_chunks(data)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "WEBP", "BMP")) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode not in PNG_MODES:
                image = image.convert("RGBA" if "A" in image.mode else "RGB")
            image.info = {}
            buffer = io.BytesIO()
            image.save(buffer, "PNG", compress_level=1)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a PNG, JPEG or WebP image (or BMP): {error}") from None
    return _png_pixel_chunks(buffer.getvalue())


def served_image(study: Study, token: str) -> bytes | None:
    """The pixels of the registered image with this token, or None (unknown token, file moved, replaced by a
    symlink, not an image suffix, or not an image)."""
    path = study.image_path(token)
    if path is None or path.resolve() != path or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        return None
    try:
        return image_pixels_only(path.read_bytes())
    except (OSError, ValueError):
        return None


# ---- who is voting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may vote and who may read the results.

    ``password``: the raters' shared password (any new name up to ``max_raters``; None: open enrolment);
    without it, only raters with a key may log in, or, in a study where nobody has a key, anyone with any
    name (for a study at one desk). A rater who holds a key logs in only with it. ``organiser_password``
    guards the results and the CSV; without it they are not served at all.
    """

    password: str | None = None
    organiser_password: str | None = None
    max_raters: int | None = DEFAULT_MAX_RATERS

    def describe(self, study: Study) -> str:
        """One line for the organiser: how raters get in."""
        cap = "no cap on new raters" if self.max_raters is None else f"at most {self.max_raters} raters"
        if self.password:
            return f"raters log in with any name and the study password ({cap}) or their own link"
        if study.has_key():
            return "only the raters you added (user_study.py raters add) can log in, with their link or password"
        return f"no password: anyone who can reach the page votes under any name ({cap})"


class LoginRefused(ValueError):
    """A login the gate refused; the message says why and what to do, and ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Gate:
    """Logs raters in and maps their session cookies to rater ids (in memory: a restart logs everyone out;
    at most ``MAX_SESSIONS``, so repeated logins cannot fill the memory)."""

    def __init__(self, study: Study, access: Access) -> None:
        self.study, self.access = study, access
        self.sessions: dict[str, str] = {}
        self._lock = threading.Lock()

    def login(self, name: str, password: str) -> str:
        """The rater id for this name and password, admitted to the study, or :class:`LoginRefused`."""
        try:
            rater = check_rater(name)
        except ValueError as error:
            raise LoginRefused(str(error), 400) from None
        wrong = LoginRefused("Wrong name or password: use the ones (or the link) the organiser gave you", 401)
        if self.study.has_key(rater):
            if self.study.key_owner(password) != rater:
                raise wrong
            return rater
        if self.access.password is not None:
            if not secrets.compare_digest(password.encode(), self.access.password.encode()):
                raise wrong
        elif self.study.has_key():
            raise LoginRefused("This study admits only the raters the organiser added: use your own link", 403)
        try:
            return self.study.enrol(rater, self.access.max_raters)
        except ValueError as error:
            raise LoginRefused(str(error), 403) from None

    def start_session(self, rater: str) -> str:
        """A new random session token for a logged-in rater."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.sessions[token] = rater
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        return token

    def rater_of(self, request: "Request") -> str | None:
        """The rater of a request's session cookie, or None (gradio's ``auth_dependency``)."""
        return self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))

    def end_session(self, request: "Request") -> None:
        with self._lock:
            self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)

    def organiser(self, request: "Request") -> bool:
        """Whether the request carries the organiser password (HTTP basic auth, any user name)."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            _, _, given = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.access.organiser_password
        return scheme.lower() == "basic" and expected is not None and secrets.compare_digest(
            given.encode(), expected.encode())


# ---- the page -----------------------------------------------------------------------------------


def pair_html(shown: Shown) -> str:
    """The prompt and the two images of a pair, by their tokens (relative URLs: works under a proxy path)."""
    figures = "".join(
        f'<figure><img src="study/image/{token}" alt="{side} image"><figcaption>{side}</figcaption></figure>'
        for side, token in (("Left", shown.left_image), ("Right", shown.right_image)))
    return f'<p class="study-prompt">{html.escape(shown.prompt)}</p><div class="study-pair">{figures}</div>'


def page(gr: Any, study: Study, rater: str) -> tuple[Any, ...]:
    """The outputs of every event: progress line, pair view, pair id, buttons."""
    shown, progress = study.next_pair(rater), study.progress(rater)
    view = pair_html(shown) if shown else f"<h3>All {progress.total} pairs rated: thank you!</h3>"
    status = f'{html.escape(rater)} · {progress} · <a href="study/logout">not {html.escape(rater)}?</a>'
    return status, view, shown.pair_id if shown else None, gr.Row(visible=shown is not None)


def session_rater(gr: Any, request: Any) -> str:
    """The rater the server logged in for this request (never a value the page sent)."""
    if not request.username:
        raise gr.Error("You are not logged in: reload the page")
    return request.username


def vote(gr: Any, study: Study, choice: Choice, pair_id: float | None, request: Any) -> tuple[Any, ...]:
    """Record the session rater's vote on their current pair, then show the next one.

    A vote on any other pair (sent twice, from an old tab, or made up) is ignored.
    """
    rater = session_rater(gr, request)
    shown = study.next_pair(rater)
    if shown is not None and pair_id == shown.pair_id:
        study.vote(rater, shown.pair_id, choice)
    return page(gr, study, rater)


def build_blocks(study: Study) -> Any:
    """The gradio page: the pair and the three vote buttons (no results: those are for the organiser)."""
    gr = import_gradio()
    with gr.Blocks(title="HG-DPO user study") as blocks:
        gr.Markdown(f"## {QUESTION}")
        progress = gr.HTML(elem_id="study-progress")
        view = gr.HTML(elem_id="study-pair")
        pair_id = gr.Number(visible=False, precision=0)
        with gr.Row(visible=False) as buttons:
            vote_buttons = {choice: gr.Button(label, elem_id=f"vote-{choice}",
                                              variant="secondary" if choice == "tie" else "primary")
                            for choice, label, _ in VOTE_BUTTONS}
        outputs = [progress, view, pair_id, buttons]

        def current(request: gr.Request) -> tuple[Any, ...]:  # gradio passes the request by this annotation
            return page(gr, study, session_rater(gr, request))

        blocks.load(current, outputs=outputs, api_name="current")
        for choice, button in vote_buttons.items():
            def cast(pair: float | None, request: gr.Request, choice: Choice = choice) -> tuple[Any, ...]:
                return vote(gr, study, choice, pair, request)

            button.click(cast, inputs=pair_id, outputs=outputs, api_name=f"vote_{choice}", show_progress="hidden")
    blocks.queue(default_concurrency_limit=None)  # events are short SQLite transactions: run them in parallel
    return blocks


# ---- the server ---------------------------------------------------------------------------------


def login_page(study: Study, access: Access, error: str = "", status: int = 200) -> "Response":
    """The login form (no password field in a study without one)."""
    from fastapi.responses import HTMLResponse

    needs_password = access.password is not None or study.has_key()
    hint = ("Your name and the password you were given." if needs_password
            else "Your name (this study has no password).")
    text = LOGIN_PAGE.format(question=html.escape(QUESTION), hint=hint, error=html.escape(error),
                             password=PASSWORD_FIELD if needs_password else "")
    return HTMLResponse(text, status_code=status, headers={"Cache-Control": "no-store"})


def logged_in(gate: Gate, rater: str, request: "Request") -> "Response":
    """A redirect to the voting page carrying a new session cookie for ``rater``."""
    from fastapi.responses import RedirectResponse

    response = RedirectResponse("../", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(SESSION_COOKIE, gate.start_session(rater), httponly=True, samesite="lax", path="/",
                        secure=request.url.scheme == "https")
    return response


def login_routes(study: Study, gate: Gate) -> "APIRouter":
    """Log in with a name and password, enter with a personal link, log out."""
    from fastapi import APIRouter, Request
    from fastapi.responses import RedirectResponse, Response

    router = APIRouter()

    @router.get("/study/login")
    def login_form() -> Response:
        return login_page(study, gate.access)

    @router.post("/study/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return login_page(study, gate.access, "The form is too long: a name has at most 64 characters", 413)
        form = parse_qs(body.decode("utf-8", "replace"))
        try:
            rater = gate.login(form.get("name", [""])[0], form.get("password", [""])[0])
        except LoginRefused as error:
            return login_page(study, gate.access, str(error), error.status)
        return logged_in(gate, rater, request)

    @router.get("/study/enter")
    def enter(request: Request, key: str = "") -> Response:
        rater = study.key_owner(key) if key else None
        if rater is None:
            return login_page(study, gate.access, "This link is not valid (any more): ask the organiser for yours", 403)
        return logged_in(gate, rater, request)

    @router.get("/study/logout")
    def logout(request: Request) -> Response:
        gate.end_session(request)
        response = RedirectResponse("login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router


def study_routes(study: Study, gate: Gate) -> "APIRouter":
    """The registered images by token (for logged-in raters) and the results (for the organiser only)."""
    from fastapi import APIRouter, HTTPException, Request, Response
    from fastapi.responses import PlainTextResponse

    router = APIRouter()

    @router.get("/study/image/{token}")
    def image(token: str, request: Request) -> Response:
        if gate.rater_of(request) is None:
            raise HTTPException(status_code=401, detail="Not logged in")
        pixels = served_image(study, token)
        if pixels is None:
            raise HTTPException(status_code=404, detail="No such image in this study")
        return Response(pixels, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    def organiser_only(request: Request) -> None:
        if gate.access.organiser_password is None:
            raise HTTPException(status_code=404, detail="Not found")
        if not gate.organiser(request):
            raise HTTPException(status_code=401, detail="The organiser password is needed",
                                headers={"WWW-Authenticate": 'Basic realm="HG-DPO study results"'})

    @router.get("/study/results")
    def results(request: Request) -> Response:
        organiser_only(request)
        text = f"{format_results(study.results())}\n\nAll votes: votes.csv\n"
        return PlainTextResponse(text, headers={"Cache-Control": "no-store"})

    @router.get("/study/votes.csv")
    def votes(request: Request) -> Response:
        organiser_only(request)
        return Response(study.votes_csv(), media_type="text/csv", headers={
            "Content-Disposition": 'attachment; filename="votes.csv"', "Cache-Control": "no-store"})

    return router


class SecurityHeaders:
    """ASGI middleware: security headers on every response, and the login page for a visitor without a session."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        from fastapi import Request
        from fastapi.responses import RedirectResponse

        if scope["path"] == "/" and self.gate.rater_of(Request(scope)) is None:
            await RedirectResponse("study/login", status_code=303)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def build_app(study: Study, access: Access | None = None) -> "FastAPI":
    """The whole server app: the gradio page at ``/``, the login and the study's routes."""
    from fastapi import FastAPI

    gr = import_gradio()
    gate = Gate(study, access or Access())
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    gr.mount_gradio_app(app, build_blocks(study), path="/", auth_dependency=gate.rater_of, footer_links=[],
                        theme=theme, css=CSS, head=shortcut_script(), max_file_size=1)  # the page takes no uploads
    app.router.routes[:0] = login_routes(study, gate).routes + study_routes(study, gate).routes
    app.add_middleware(SecurityHeaders, gate=gate)
    return app


def serve(study_path: str | Path, host: str = "127.0.0.1", port: int = 7860, access: Access | None = None) -> None:
    """Serve a study until interrupted."""
    import uvicorn

    study, access = Study(study_path), access or Access()
    app = build_app(study, access)
    print(f"Serving the user study at http://{host}:{port}/ (Ctrl+C to stop): {access.describe(study)}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
