"""`cmkit serve`: a web page and HTTP API for one-step generation and zero-shot editing.

    cmkit serve --checkpoint runs/fm-cd            # http://127.0.0.1:8000

Endpoints (OpenAPI description at /openapi.json; interactive docs at /docs with --docs):
    GET  /                   the page
    GET  /healthz            {"status": "ok"}: the server is up (no token needed)
    GET  /metrics            Prometheus metrics (`metrics.py`)
    GET  /api/info           the model: shape, classes, guidance range, limits
    GET  /local/             the in-browser mode: the page `cmkit export web` writes, generating on
                             the visitor's machine (served with the cross-origin isolation headers)
    POST /api/generate       JSON {n, seed, steps | sigmas, class, guidance, prompt, format: png | json}
    POST /api/edit/{task}    multipart: image [+ mask] files and form fields; task: inpaint,
                             colorize, superres, stroke, denoise
    POST /api/interpolate    JSON {seed_a, seed_b, frames, class, guidance, format}

PNG answers are image grids; JSON answers carry each image as a PNG data URL (vectors: numbers),
with the server-side latency in ``latency_ms`` and the ``X-Latency-Ms`` header. Every error, of
any status, is JSON {"error": message}; a failure inside the server is a 500 with a generic
message (the traceback goes to the server's log, never to the client). Requests never name
files: the server reads only the run it was started with. `guard.py` checks every request
(host, token, origin, body size and pace) before a route sees it.

Generations go to one lane, micro-batched (`batcher.py`); edits and interpolations to another,
one at a time, so a long edit never holds up generations. Uploads are decoded and answers encoded
in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import CmkitError
from ..text import MAX_PROMPT_CHARS
from .batcher import Busy, ClientGone, MicroBatcher, Superseded
from ..editing.tasks import LATENT_TASKS
from .engine import EDIT_TASKS, Engine, Limits
from .guard import Access, Guard
from .live import add_live_route
from .metrics import ServeMetrics
from .static_site import TYPES, BrowserSite
from ..export.web import ISOLATION_HEADERS

log = logging.getLogger("cmkit.serve")
EDIT_FILES = ("image", "mask")


# JSON bodies are strict: true is not 1, "7" is not 7 and 2.5 is not an integer (floats take integers).
JSON_MODEL = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class GenerateRequest(BaseModel):
    model_config = JSON_MODEL
    n: int = Field(4, description="number of samples")
    seed: int = 0
    steps: int | None = Field(None, description="sampling steps (default 1; a teacher's Heun steps)")
    sigmas: list[float] | None = Field(None, description="explicit decreasing noise levels (instead of steps)")
    class_: str | int | list[str | int] | None = Field(None, alias="class",
                                                        description="index, name, list, 'random' or 'null'")
    guidance: float | None = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                               description="text-conditioned models: the prompt (default the empty prompt)")
    format: Literal["png", "json"] = "png"


class InterpolateRequest(BaseModel):
    model_config = JSON_MODEL
    seed_a: int = 0
    seed_b: int = 1
    frames: int = 8
    class_: str | int | None = Field(None, alias="class")
    guidance: float | None = None
    format: Literal["png", "json"] = "json"


class EditFields(BaseModel):
    """The form fields of /api/edit/{task} (besides the image and mask files)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    seed: int = 0
    steps: int | None = None
    n: int = 1
    class_: str | None = Field(None, alias="class")
    guidance: float | None = None
    factor: int = Field(2, description="superres: the upscaling factor")
    sigma: float = Field(0.2, description="denoise: the noise level of the input")
    format: Literal["png", "json"] = "png"


def png_bytes(images: np.ndarray, cols: int | None = None) -> bytes:
    """uint8 (N, C, H, W) images as one PNG grid."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = img.transpose(1, 2, 0)
    buf = io.BytesIO()
    # Level 1: answers are small and fresh; zlib's default level costs several times the time.
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_urls(images: np.ndarray) -> list[str]:
    return ["data:image/png;base64," + base64.b64encode(png_bytes(img[None], 1)).decode() for img in images]


def encode(data: np.ndarray, fmt: str, image: bool) -> tuple[bytes, str]:
    """(body, media type) of an answer (a worker thread runs this)."""
    import json
    if fmt == "png":
        if not image:
            raise CmkitError("PNG output needs an image model; ask for format=json")
        return png_bytes(data), "image/png"
    body = {"images": data_urls(data)} if image else {"samples": np.asarray(data).tolist()}
    return json.dumps({**body, "n": len(data)}).encode(), "application/json"


async def answer(data: np.ndarray, fmt: str, image: bool, start: float, metrics: ServeMetrics) -> Response:
    body, media = await asyncio.to_thread(encode, data, fmt, image)
    latency = round(1000 * (time.perf_counter() - start), 2)
    if media == "application/json":  # the latency goes in last, once it is known
        body = body[:-1] + f', "latency_ms": {latency}}}'.encode()
    metrics.images.inc(len(data))
    return Response(body, media_type=media, headers={"X-Latency-Ms": str(latency)})


def _class_spec(value):
    from ..classes import parse_class_spec
    if value is None:
        return None
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return parse_class_spec(text)


SESSION_HEADER = "x-cmkit-session"
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def session_of(request: Request) -> str | None:
    """The live session a request belongs to (``X-Cmkit-Session``): a newer request of the same
    session drops this one while it waits."""
    session = request.headers.get(SESSION_HEADER)
    if session is not None and not SESSION_PATTERN.fullmatch(session):
        raise CmkitError("X-Cmkit-Session must be 1 to 64 letters, digits, '_', '.' or '-'")
    return session


async def disconnected(request: Request) -> None:
    """Finishes when the client has gone (after the body was read, ASGI's next message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_message(text: str) -> str:
    """An error message safe to send: one line, no object addresses."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(text)).strip()
    return (text.splitlines() or ["invalid request"])[0][:500]


def _validation_message(errors: list) -> str:
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
    return f"{where}: {first.get('msg')}" if where else first.get("msg", "invalid request")


def create_app(run, *, limits: Limits = Limits(), access: Access = Access(), window: float = 0.005,
               max_queue: int = 64, read_timeout: float = 30.0, docs: bool = False, warmup: bool = True) -> FastAPI:
    """The ASGI app serving ``run`` (see the module docstring)."""
    engine, metrics = Engine(run, limits), ServeMetrics()
    generations = MicroBatcher(engine.run_group, window=window, max_batch=limits.max_n, max_queue=max_queue,
                               on_batch=metrics.batch_size.labels("generate").observe,
                               on_drop=lambda reason: metrics.dropped.labels("generate", reason).inc())
    edits = MicroBatcher(engine.run_group, window=0, max_batch=1, max_queue=max_queue,
                         on_batch=metrics.batch_size.labels("edit").observe,
                         on_drop=lambda reason: metrics.dropped.labels("edit", reason).inc())
    metrics.queue_depth.labels("generate").set_function(generations.depth)
    metrics.queue_depth.labels("edit").set_function(edits.depth)

    @asynccontextmanager
    async def lifespan(app):
        if warmup:  # the first call pays for lazy initialisation; no user should
            key, work = engine.generation(n=1, seed=0, steps=None, sigmas=None, class_spec=None, guidance=None)
            engine.run_group([work])
        await generations.start()
        await edits.start()
        yield
        await generations.stop()
        await edits.stop()

    app = FastAPI(title="cmkit", description="One-step generation and zero-shot editing with a consistency model.",
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None)
    app.state.batcher, app.state.edits, app.state.engine, app.state.metrics = generations, edits, engine, metrics
    app.add_middleware(Guard, access=access, read_timeout=read_timeout, metrics=metrics,
                       body_limit=lambda path: limits.body_bytes(multipart=path.startswith("/api/edit/")))

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": client_message(message)}, status_code=status, headers=headers)

    @app.exception_handler(CmkitError)
    async def user_error(request: Request, e: CmkitError):
        return error(400, str(e))

    @app.exception_handler(HTTPException)  # 404, 405, and the guard's refusals while a body streams
    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy):
        return error(503, str(e), {"Retry-After": "1"})

    @app.exception_handler(Superseded)
    async def superseded(request: Request, e: Superseded):
        return error(409, str(e))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):
        return error(499, str(e))  # nginx's "client closed request": nobody reads it, the metrics do

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error(400, _validation_message(e.errors()))

    @app.exception_handler(ValidationError)
    async def invalid_fields(request: Request, e: ValidationError):
        return error(400, _validation_message(e.errors()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("cmkit.serve").joinpath("page.html").read_text()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    browser = BrowserSite(run)

    @app.get("/local/{path:path}", include_in_schema=False)
    async def local_site(path: str = ""):
        """The in-browser mode: the run exported as a web page (built at the first request)."""
        file = await browser.file(path or "index.html")
        return FileResponse(file, headers={**ISOLATION_HEADERS, "Cross-Origin-Resource-Policy": "same-origin",
                                           "Cache-Control": "no-cache"}, media_type=TYPES.get(file.suffix))

    @app.get("/api/info")
    async def info():
        prompt = {"max_chars": MAX_PROMPT_CHARS, "max_tokens": run.prompts.max_length} if run.takes_text else None
        return {"method": run.method, "shape": list(run.image_shape), "image": run.is_image, "prompt": prompt,
                "num_classes": run.num_classes, "class_names": run.class_names,
                "has_null_label": run.has_null_label, "guidance_range": run.guidance_range,
                "is_diffusion": run.is_diffusion, "limits": limits.__dict__,
                "edit_tasks": [t for t in EDIT_TASKS if not run.is_latent or t in LATENT_TASKS],
                "in_browser": browser.unavailable() is None and access.token is None}

    @app.post("/api/generate")
    async def generate(req: GenerateRequest, request: Request):
        start = time.perf_counter()
        key, work = engine.generation(n=req.n, seed=req.seed, steps=req.steps, sigmas=req.sigmas,
                                      class_spec=_class_spec(req.class_), guidance=req.guidance, prompt=req.prompt)
        data = await generations.submit(key, work.n, work, session=session_of(request), gone=lambda: disconnected(request))
        return await answer(data, req.format, run.is_image, start, metrics)

    add_live_route(app, engine=engine, generations=generations, edits=edits, limits=limits, metrics=metrics,
                   encode_png=png_bytes)

    @app.post("/api/interpolate")
    async def interpolate(req: InterpolateRequest, request: Request):
        start = time.perf_counter()
        job = engine.interpolation(seed_a=req.seed_a, seed_b=req.seed_b, frames=req.frames,
                                   class_spec=_class_spec(req.class_), guidance=req.guidance)
        data = await edits.submit(None, req.frames, job, gone=lambda: disconnected(request))
        return await answer(data, req.format, run.is_image, start, metrics)

    def decode_upload(upload: UploadFile | None, what: str, size: tuple[int, int], grey: bool) -> np.ndarray:
        """(1, C, H, W) uint8 at ``size`` from an uploaded PNG/JPEG (a worker thread runs this)."""
        if upload is None:
            raise CmkitError(f"this task needs an {what} upload")
        if upload.size is not None and upload.size > limits.max_upload_bytes:
            raise HTTPException(413, f"the {what} is over the upload limit of {limits.max_upload_bytes} bytes")
        upload.file.seek(0)
        return engine.decode_picture(upload.file, what, size, grey)

    @app.post("/api/edit/{task}", openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"image": {"type": "string", "format": "binary"},
                                         "mask": {"type": "string", "format": "binary"},
                                         **EditFields.model_json_schema(by_alias=True)["properties"]}}}}}})
    async def edit(task: str, request: Request):
        start = time.perf_counter()
        if task not in EDIT_TASKS:
            raise HTTPException(404, f"unknown task {task!r}; tasks: {', '.join(EDIT_TASKS)}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise CmkitError("send the image (and mask) as multipart/form-data")
        async with request.form(max_files=len(EDIT_FILES), max_fields=len(EditFields.model_fields),
                                max_part_size=limits.max_json_bytes) as form:
            files = {k: v for k, v in form.multi_items() if isinstance(v, UploadFile)}
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
            if set(files) - set(EDIT_FILES):
                raise CmkitError(f"unexpected file field(s) {sorted(set(files) - set(EDIT_FILES))}; "
                                 f"send {' and '.join(EDIT_FILES)}")
            values = EditFields.model_validate(fields)
            checked = engine.edit(task, seed=values.seed, steps=values.steps, n=values.n,
                                  class_spec=_class_spec(values.class_), guidance=values.guidance,
                                  factor=values.factor, sigma=values.sigma)
            picture = await asyncio.to_thread(decode_upload, files.get("image"), "image", checked.size, checked.grey)
            holes = None
            if checked.needs_mask:
                mask = await asyncio.to_thread(decode_upload, files.get("mask"), "mask", run.image_shape[1:], True)
                holes = mask[0, 0] > 127  # on the image's grid: a latent model maps it to its cells itself
        data = await edits.submit(None, values.n, engine.edit_call(checked, picture, holes),
                                  session=session_of(request), gone=lambda: disconnected(request))
        return await answer(data, values.format, True, start, metrics)

    return app
