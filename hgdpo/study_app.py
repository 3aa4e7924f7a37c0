"""The pairwise user study's web page (gradio) and its server, over :class:`hgdpo.study.Study`.

A rater enters their id once (or opens ``/?rater=ID``; with a password, the login name is the
default), then sees the prompt and two images and answers "Which image looks more natural?" with one
click: Left, Right or Tie (keys ← → ↓). The Results tab shows model A's win rate with its 95%
interval per model pair and links the votes as CSV.

The page is a gradio app mounted on a FastAPI app that also serves the study's own routes, guarded
by the same login as the page: ``/study/image/<token>`` (only images registered in the study, by
their random token; PNG text chunks, which name the generation settings, are stripped) and
``/study/votes.csv``. gradio is imported lazily: it is the optional ``app`` extra.
"""

import html
import mimetypes
import os
import secrets
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hgdpo.study import Choice, Shown, Study, format_results

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI, Request

__all__ = ["QUESTION", "build_app", "import_gradio", "serve", "strip_png_text"]

QUESTION = "Which image looks more natural?"
MISSING_GRADIO = (
    'The user-study app needs gradio: pip install ".[app]" (in the hgdpo checkout) or pip install "gradio>=6"'
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_METADATA_CHUNKS = frozenset({b"tEXt", b"iTXt", b"zTXt", b"eXIf"})
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


def strip_png_text(data: bytes) -> bytes:
    """PNG bytes without text and EXIF chunks (the generation parameters could name the model)."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept, offset = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        end = offset + 12 + int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + 8] not in PNG_METADATA_CHUNKS:
            kept.append(data[offset:end])
        offset = end
    return b"".join(kept)


# ---- the page -----------------------------------------------------------------------------------


def pair_html(shown: Shown) -> str:
    """The prompt and the two images of a pair, by their tokens (relative URLs: works under a proxy path)."""
    figures = "".join(
        f'<figure><img src="study/image/{token}" alt="{side} image"><figcaption>{side}</figcaption></figure>'
        for side, token in (("Left", shown.left_image), ("Right", shown.right_image)))
    return f'<p class="study-prompt">{html.escape(shown.prompt)}</p><div class="study-pair">{figures}</div>'


def page(gr: Any, study: Study, rater: str) -> tuple[Any, ...]:
    """The outputs of every event: rater id, start row, vote area, progress, pair view, pair id, buttons."""
    shown, progress = study.next_pair(rater), study.progress(rater)
    view = pair_html(shown) if shown else f"<h3>All {progress.total} pairs rated: thank you!</h3>"
    return (rater, gr.Row(visible=False), gr.Column(visible=True), f"{html.escape(rater)} · {progress}", view,
            shown.pair_id if shown else None, gr.Row(visible=shown is not None))


def start(gr: Any, study: Study, rater: str) -> tuple[Any, ...]:
    """Register the rater and show their next pair."""
    try:
        return page(gr, study, study.register_rater(rater))
    except ValueError as error:
        raise gr.Error(str(error)) from None


def vote(gr: Any, study: Study, choice: Choice, rater: str, pair_id: float | None) -> tuple[Any, ...]:
    """Record a vote on the pair shown (a second vote on it is ignored), then show the next pair."""
    if pair_id is not None:
        try:
            study.vote(rater, int(pair_id), choice)
        except ValueError as error:
            raise gr.Error(str(error)) from None
    return page(gr, study, rater)


def on_load(gr: Any, study: Study, request: Any) -> Any:
    """Start at once for a rater id in the URL (``?rater=``) or the login name, else leave the page as it is."""
    rater = request.query_params.get("rater") or request.username
    return start(gr, study, rater) if rater else gr.skip()  # skip: keep what the rater may have typed already


def results_markdown(study: Study) -> str:
    """The Results tab: the table and the CSV link."""
    return f"{format_results(study.results())}\n\n[Download all votes (CSV)](study/votes.csv)"


def build_blocks(study: Study, show_results: bool = True) -> Any:
    """The gradio page: a Vote tab and, unless hidden from raters, a Results tab."""
    gr = import_gradio()
    with gr.Blocks(title="HG-DPO user study") as blocks:
        gr.Markdown(f"## {QUESTION}")
        with gr.Tab("Vote"):
            with gr.Row() as start_row:  # shown until a rater id is known (also if the page's load event fails)
                rater = gr.Textbox(label="Your rater id", placeholder="e.g. your initials", elem_id="rater-id",
                                   scale=4)
                start_button = gr.Button("Start", variant="primary", scale=1)
            with gr.Column(visible=False) as vote_area:
                progress = gr.HTML(elem_id="study-progress")
                view = gr.HTML(elem_id="study-pair")
                pair_id = gr.Number(visible=False, precision=0)
                with gr.Row(visible=False) as buttons:
                    vote_buttons = {choice: gr.Button(label, elem_id=f"vote-{choice}",
                                                      variant="secondary" if choice == "tie" else "primary")
                                    for choice, label, _ in VOTE_BUTTONS}
        outputs = [rater, start_row, vote_area, progress, view, pair_id, buttons]
        gr.on([start_button.click, rater.submit], partial(start, gr, study), inputs=rater, outputs=outputs,
              api_name="start", show_progress="hidden")
        for choice, button in vote_buttons.items():
            button.click(partial(vote, gr, study, choice), inputs=[rater, pair_id], outputs=outputs,
                         api_name=f"vote_{choice}", show_progress="hidden")

        def load(request: gr.Request) -> Any:  # gradio passes the request by this annotation
            return on_load(gr, study, request)

        blocks.load(load, outputs=outputs, api_visibility="private")
        if show_results:
            with gr.Tab("Results") as results_tab:
                table = gr.Markdown(elem_id="study-results")
                refresh = gr.Button("Refresh")
            gr.on([results_tab.select, refresh.click], partial(results_markdown, study), outputs=table,
                  api_visibility="private")
    blocks.queue(default_concurrency_limit=None)  # events are short SQLite transactions: run them in parallel
    return blocks


# ---- the server ---------------------------------------------------------------------------------


def gradio_login_check(gradio_app: Any) -> "Callable[[Request], None]":
    """A FastAPI dependency answering 401 unless the request carries a login of the gradio app (if it has auth).

    It checks the session cookie gradio sets at login the way gradio's own routes do; should gradio
    rename it, logged-in users get 401 (the study's tests fail), never the reverse.
    """
    from fastapi import HTTPException, Request

    def require_login(request: Request) -> None:
        if gradio_app.auth is None:
            return
        cookie_id = gradio_app.cookie_id
        token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
            f"access-token-unsecure-{cookie_id}")
        if token not in gradio_app.tokens:
            raise HTTPException(status_code=401, detail="Not logged in")

    return require_login


def study_routes(study: Study, require_login: "Callable[[Request], None]", with_csv: bool) -> "APIRouter":
    """The registered images by token and (for the Results tab) the votes as CSV."""
    from fastapi import APIRouter, Depends, HTTPException, Response

    router = APIRouter(dependencies=[Depends(require_login)])

    @router.get("/study/image/{token}")
    def image(token: str) -> Response:
        path = study.image_path(token)
        if path is None or not path.is_file():
            raise HTTPException(status_code=404, detail="No such image in this study")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(strip_png_text(path.read_bytes()), media_type=media_type,
                        headers={"Cache-Control": "private, max-age=86400"})

    if with_csv:
        @router.get("/study/votes.csv")
        def votes() -> Response:
            return Response(study.votes_csv(), media_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="votes.csv"'})

    return router


def password_check(password: str) -> Callable[[str, str], bool]:
    """A gradio ``auth`` function accepting any user name with ``password`` (compared in constant time)."""
    return lambda _user, given: secrets.compare_digest(given.encode(), password.encode())


def build_app(study: Study, password: str | None = None, show_results: bool = True) -> "FastAPI":
    """The whole server app: the gradio page at ``/`` and the study's routes, behind ``password`` if set."""
    from fastapi import FastAPI

    gr = import_gradio()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    auth = password_check(password) if password else None
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    gr.mount_gradio_app(app, build_blocks(study, show_results), path="/", auth=auth, footer_links=[],
                        auth_message="Any user name (it becomes your rater id) and the study's password.",
                        theme=theme, css=CSS, head=shortcut_script())
    gradio_app = app.routes[-1].app  # the Mount just added
    app.router.routes[:0] = study_routes(study, gradio_login_check(gradio_app), show_results).routes
    return app


def serve(study_path: str | Path, host: str = "127.0.0.1", port: int = 7860, password: str | None = None,
          show_results: bool = True) -> None:
    """Serve a study until interrupted."""
    import uvicorn

    app = build_app(Study(study_path), password, show_results)
    print(f"Serving the user study at http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
