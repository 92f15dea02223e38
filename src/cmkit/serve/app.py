"""`cmkit serve`: a local web page and HTTP API for one-step generation and zero-shot editing.

    cmkit serve --checkpoint runs/fm-cd            # http://127.0.0.1:8000, API docs at /docs

Endpoints (OpenAPI description at /openapi.json):
    GET  /                   the page
    GET  /api/info           the model: shape, classes, guidance range, limits
    POST /api/generate       JSON {n, seed, steps | sigmas, class, guidance, format: png | json}
    POST /api/edit/{task}    multipart: image [+ mask] files and form fields; task: inpaint,
                             colorize, superres, stroke, denoise
    POST /api/interpolate    JSON {seed_a, seed_b, frames, class, guidance, format}

PNG answers are image grids; JSON answers carry each image as a PNG data URL (vectors: numbers),
with the server-side latency in ``latency_ms`` and the ``X-Latency-Ms`` header. Errors are JSON
{"error": message}: 400 for a bad request, 413 for an upload over the limit, 503 when the queue
is full; a failure inside the server is a 500 with a generic message (the traceback goes to the
server's log, never to the client). Requests never name files: the server reads only the run it
was started with.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..editing.tasks import TASKS
from ..errors import CmkitError
from .batcher import Busy, MicroBatcher
from .engine import Engine, Limits

log = logging.getLogger("cmkit.serve")
EDIT_TASKS = tuple(name for name, task in TASKS.items() if task.image)  # interpolation has its own endpoint


class GenerateRequest(BaseModel):
    n: int = Field(4, description="number of samples")
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(None, description="sampling steps (default 1; a teacher's Heun steps)")
    sigmas: list[float] | None = Field(None, description="explicit decreasing noise levels (instead of steps)")
    class_: str | int | list[str | int] | None = Field(None, alias="class",
                                                        description="index, name, list, 'random' or 'null'")
    guidance: float | None = None
    format: Literal["png", "json"] = "png"


class InterpolateRequest(BaseModel):
    seed_a: int = Field(0, ge=0, lt=2**63)
    seed_b: int = Field(1, ge=0, lt=2**63)
    frames: int = 8
    class_: str | int | None = Field(None, alias="class")
    guidance: float | None = None
    format: Literal["png", "json"] = "json"


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def data_urls(images: np.ndarray) -> list[str]:
    return ["data:image/png;base64," + base64.b64encode(png_bytes(img[None], 1)).decode() for img in images]


def _answer(data: np.ndarray, fmt: str, image: bool, start: float) -> Response:
    latency = round(1000 * (time.perf_counter() - start), 2)
    headers = {"X-Latency-Ms": str(latency)}
    if fmt == "png":
        if not image:
            raise HTTPProblem(400, "PNG output needs an image model; ask for format=json")
        return Response(png_bytes(data), media_type="image/png", headers=headers)
    body = {"images": data_urls(data)} if image else {"samples": np.asarray(data).tolist()}
    return JSONResponse({**body, "latency_ms": latency, "n": len(data)}, headers=headers)


def _class_spec(value):
    from ..classes import parse_class_spec
    if value is None:
        return None
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return parse_class_spec(text)


def create_app(run, *, limits: Limits = Limits(), window: float = 0.005, max_queue: int = 64,
               warmup: bool = True) -> FastAPI:
    engine = Engine(run, limits)
    batcher = MicroBatcher(engine.run_group, window=window, max_batch=limits.max_n, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        if warmup:  # the first call pays for lazy initialisation; no user should
            key, work = engine.generation(n=1, seed=0, steps=None, sigmas=None, class_spec=None, guidance=None)
            engine.run_group([work])
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="cmkit", description="One-step generation and zero-shot editing with a consistency model.",
                  lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.exception_handler(CmkitError)
    async def user_error(request: Request, e: CmkitError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, e: HTTPProblem):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy):
        return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}" if where else first.get("msg")}, status_code=400)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("cmkit.serve").joinpath("page.html").read_text()

    @app.get("/api/info")
    async def info():
        return {"method": run.method, "shape": list(run.shape), "image": run.is_image,
                "num_classes": run.num_classes, "class_names": run.class_names,
                "has_null_label": run.has_null_label, "guidance_range": run.guidance_range,
                "is_diffusion": run.is_diffusion, "limits": limits.__dict__, "edit_tasks": list(EDIT_TASKS)}

    @app.post("/api/generate")
    async def generate(req: GenerateRequest):
        start = time.perf_counter()
        key, work = engine.generation(n=req.n, seed=req.seed, steps=req.steps, sigmas=req.sigmas,
                                      class_spec=_class_spec(req.class_), guidance=req.guidance)
        data = await batcher.submit(key, req.n, work)
        return _answer(data, req.format, run.is_image, start)

    @app.post("/api/interpolate")
    async def interpolate(req: InterpolateRequest):
        from ..editing.tasks import interpolate as interpolate_task
        start = time.perf_counter()
        if not 2 <= req.frames <= limits.max_frames:
            raise CmkitError(f"frames must be in [2, {limits.max_frames}], got {req.frames}")
        spec = _class_spec(req.class_)
        job = lambda: interpolate_task(run, req.seed_a, req.seed_b, req.frames, class_labels=spec,
                                       guidance=req.guidance)
        data = await batcher.submit(None, req.frames, job)
        return _answer(data, req.format, run.is_image, start)

    async def read_upload(upload: UploadFile | None, what: str, grey: bool) -> np.ndarray:
        from ..safe_io import read_image
        if upload is None:
            raise CmkitError(f"this task needs an {what} upload")
        raw = await upload.read(limits.max_upload_bytes + 1)
        if len(raw) > limits.max_upload_bytes:
            raise HTTPProblem(413, f"the {what} is over the upload limit of {limits.max_upload_bytes} bytes")
        return read_image(io.BytesIO(raw), name=what, mode="L" if grey else "RGB")

    def fit(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(H, W[, C]) uint8 at ``size`` (resized if it differs), as (1, C, H, W)."""
        from PIL import Image
        if arr.shape[:2] != size:
            arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
        return (arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]).copy()

    @app.post("/api/edit/{task}")
    async def edit(task: str, image: UploadFile | None = File(None), mask: UploadFile | None = File(None),
                   seed: int = Form(0), steps: int | None = Form(None), n: int = Form(1),
                   class_: str | None = Form(None, alias="class"), guidance: float | None = Form(None),
                   factor: int = Form(2), sigma: float = Form(0.2), format: Literal["png", "json"] = Form("png")):
        from ..editing import tasks
        start = time.perf_counter()
        if task not in EDIT_TASKS:
            raise HTTPProblem(404, f"unknown task {task!r}; tasks: {', '.join(EDIT_TASKS)}")
        if not run.is_image:
            raise CmkitError("editing needs an image model")
        if not 1 <= n <= limits.max_n:
            raise CmkitError(f"n must be in [1, {limits.max_n}], got {n}")
        if steps is not None and not 1 <= steps <= limits.max_edit_steps:
            raise CmkitError(f"steps must be in [1, {limits.max_edit_steps}], got {steps}")
        if not 0 <= seed < 2**63:
            raise CmkitError("seed must be in [0, 2^63)")
        c, h, w = run.shape
        spec = TASKS[task]
        if spec.factor:
            if factor < 2 or h % factor:
                raise CmkitError(f"factor must be at least 2 and divide {h}")
            size = (h // factor, w // factor)  # the upload is the low-resolution image
        else:
            size = (h, w)
        picture = fit(await read_upload(image, "image", c == 1 and not spec.grey_input), size)
        holes = fit(await read_upload(mask, "mask", True), (h, w))[0, 0] > 127 if spec.mask else None
        labels = _class_spec(class_)  # checked now: a bad request never reaches the worker
        job = lambda: tasks.run_task(run, task, picture, mask=holes, factor=factor, sigma=sigma, n=n, seed=seed,  # noqa: E731
                                     steps=steps, class_labels=labels, guidance=guidance)
        data = await batcher.submit(None, n, job)
        return _answer(data, format, True, start)

    return app
