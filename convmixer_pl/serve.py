"""`convmixer serve`: a trained checkpoint as an HTTP inference server on LitServe, with a page to drop images on.

    convmixer serve --ckpt_path checkpoints/digits/last.ckpt [--port 8000] [--max_batch_size 8 --batch_timeout 0.01]
    curl -F file=@digit.png http://127.0.0.1:8000/predict
    curl -H "Content-Type: image/png" --data-binary @digit.png http://127.0.0.1:8000/predict

The answer is `{"top_k": [{"class": "3", "prob": 0.97}, ...], "batch_size": 4}`: the top-k class names, and how
many requests ran in the same forward pass. GET / is a page to drop an image on (`serve_page.py`); docs/serving.md
has the options, the errors and the throughput.

LitServe's HTTP process reads, checks, decodes and crops uploads (the data config's per-image half, at most
`--decode_pixels` pixels at once), so a bad one is a 4xx there and never reaches a batch (LitServe fails every
request of a batch when one raises); the inference workers normalise the uint8 crops, run the model, take the top-k.
"""

# no `from __future__ import annotations`: LitServe reads decode_request's annotation (the upload dependency)

import ctypes
import os
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from .callbacks.predictions import top_classes
from .checkpoints import load_module
from .console import say
from .data.images import read_image
from .preprocessing import DataError
from .serve_page import page
from .speed import usable_cpus

FORM_FIELD = "file"
FORM_OVERHEAD = 64 * 1024  # room for a multipart body's boundaries and part headers beyond --max_bytes
HOW_TO_SEND = (f"POST the image as the multipart form field `{FORM_FIELD}` (curl -F {FORM_FIELD}=@image.jpg) or as "
               "the body with Content-Type image/* or application/octet-stream")


class ServeError(ValueError):
    """A bad `convmixer serve` option or checkpoint; the message names it and the fix."""


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None  # not glibc: its allocator decides


# -- the HTTP process: an upload becomes a uint8 crop, or a 4xx ----------------------------------------------------

class PixelBudget:
    """At most `limit` pixels decoded at once across the HTTP process's threads (a larger image waits to be alone);
    freed memory goes back to the system after a large decode (glibc would keep a burst of large uploads resident)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0
        self.condition = threading.Condition()

    @contextmanager
    def __call__(self, pixels: int):
        with self.condition:
            self.condition.wait_for(lambda: self.in_flight == 0 or self.in_flight + pixels <= self.limit)
            self.in_flight += pixels
        try:
            yield
        finally:
            with self.condition:
                self.in_flight -= pixels
                idle = self.in_flight == 0
                self.condition.notify_all()
            if idle and pixels > 2**22 and _LIBC is not None:
                _LIBC.malloc_trim(0)


@dataclass(frozen=True)
class UploadRules:
    """What the HTTP process needs to check and preprocess an upload (kept on the FastAPI app's state)."""

    mode: str  # PIL mode of the model's input
    crop: object  # the data config's per-image half: PIL image -> uint8 (C, H, W), resized, cropped
    max_bytes: int
    budget: PixelBudget


def reject(status: int, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail=" ".join(reason.split()))  # one line, whatever PIL said


def too_big(size: int, limit: int) -> HTTPException:
    return reject(413, f"the upload is {size} bytes, more than --max_bytes {limit}: send a smaller image, or start "
                       "the server with a larger --max_bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it grows past `limit` (also without a Content-Length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big(len(body), limit)
    return bytes(body)


async def form_file(request: Request, body: bytes) -> bytes:
    """The bytes of the form's `file` field."""
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise reject(400, f"malformed multipart form ({err.message}): {HOW_TO_SEND}") from err
    upload = form.get(FORM_FIELD)
    if upload is None or isinstance(upload, str):
        fields = ", ".join(form.keys()) or "none"
        raise reject(400, f"the form has no file field `{FORM_FIELD}` (its fields: {fields}): {HOW_TO_SEND}")
    try:
        return await upload.read()
    finally:
        await form.close()


def decode(data: bytes, rules: UploadRules) -> np.ndarray:
    """An image file's bytes -> the model's uint8 crop (C, H, W), or a 400/413 naming the problem (in a thread of
    the HTTP process, where PIL's decompression-bomb warning is an error: see `serve`)."""
    try:
        with Image.open(BytesIO(data)) as probe:  # the header only: the size, before any pixel is decoded
            pixels = probe.size[0] * probe.size[1]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        pixels = 0  # read_image says what is wrong with it
    try:
        with rules.budget(pixels):
            image = read_image(BytesIO(data), rules.mode)
            return np.ascontiguousarray(rules.crop(image).numpy())
    except (DataError, Image.DecompressionBombWarning) as err:  # the warning: between PIL's limit and twice it
        cause = err.__cause__ or err
        if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise reject(413, f"refused as a decompression bomb ({cause}): send a smaller image") from err
        reason = ("PIL knows no image format that starts like these bytes"
                  if isinstance(cause, Image.UnidentifiedImageError) else f"{type(cause).__name__}: {cause}")
        raise reject(400, f"not an image PIL can read ({reason}): send a PNG, JPEG, WebP, BMP, GIF or TIFF "
                          "file") from err


async def read_upload(request: Request) -> np.ndarray:
    """FastAPI dependency of the predict route: the upload, multipart (field `file`) or raw bytes (image/*,
    application/octet-stream or no Content-Type; else a 415), as the model's uint8 crop (C, H, W)."""
    rules: UploadRules = request.app.state.upload_rules
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not (multipart or media in ("", "application/octet-stream") or media.startswith("image/")):
        raise reject(415, f"Content-Type {media} is not an image upload: {HOW_TO_SEND}")
    body = await read_body(request, rules.max_bytes + (FORM_OVERHEAD if multipart else 0))
    data = await form_file(request, body) if multipart else body
    if not data:
        raise reject(400, f"the upload is empty: {HOW_TO_SEND}")
    if len(data) > rules.max_bytes:
        raise too_big(len(data), rules.max_bytes)
    return await run_in_threadpool(decode, data, rules)  # decoding would block the event loop


# -- the inference worker: batches of crops -> top-k ----------------------------------------------------------------

class ConvMixerAPI(ls.LitAPI):
    """The checkpoint's model behind LitServe: each request is one uint8 crop, answered with its top-k classes."""

    def __init__(self, ckpt_path: str, top_k: int, max_batch_size: int = 1, batch_timeout: float = 0.0,
                 workers_per_device: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k, self.workers = ckpt_path, top_k, workers_per_device

    def setup(self, device: str) -> None:
        if device == "cpu":
            # LitServe starts each worker with every core as a torch thread; they stall on each other whenever the
            # HTTP process holds a core (16 clients on 2 cores: 0.39x of batched inference, 1.20x on one thread)
            torch.set_num_threads(max(1, usable_cpus() // (self.workers + 1)))
        module = load_module(self.ckpt_path)  # in each worker process, on its own device
        self.model = module.to(device)
        self.normalise = module.data_config.batch_transform()
        self.class_names = module.class_names

    def decode_request(self, request: Annotated[np.ndarray, Depends(read_upload)]) -> torch.Tensor:
        return torch.from_numpy(request)  # read and checked in the HTTP process: read_upload

    def predict(self, crops: torch.Tensor) -> list[dict] | dict:
        """A batch (N, C, H, W) when --max_batch_size > 1 (LitServe stacks the requests), else one crop (C, H, W)."""
        batched = crops.ndim == 4
        batch = crops if batched else crops[None]
        with torch.inference_mode():
            probs = self.model(self.normalise(batch.to(self.model.device))).softmax(dim=1)
            answers = [{"top_k": ranked, "batch_size": len(batch)}
                       for ranked in top_classes(probs, self.class_names, self.top_k)]
        return answers if batched else answers[0]


# -- the server -------------------------------------------------------------------------------------------------------

def check_options(args: SimpleNamespace) -> None:
    for name in ("top_k", "max_batch_size", "max_bytes", "workers_per_device", "decode_pixels"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.batch_timeout < 0:
        raise ServeError(f"--batch_timeout must be >= 0 seconds, got {args.batch_timeout}")
    if not 1024 <= args.port <= 65535:  # LitServe's range
        raise ServeError(f"--port must be from 1024 to 65535, got {args.port}")


def resolve_devices(accelerator: str, devices: str) -> tuple[str, int]:
    """(`cpu` or `cuda`, LitServe's devices): `auto` is a GPU where there is one; a missing GPU is an error."""
    if devices != "auto" and not (devices.isdigit() and int(devices) >= 1):
        raise ServeError(f"--devices must be auto or a number of devices, got {devices}")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        if devices not in ("auto", "1"):
            raise ServeError(f"--devices {devices} with the CPU: the CPU is one device; use --workers_per_device "
                             "N for N inference processes")
        return "cpu", 1
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = available if devices == "auto" else int(devices)
    if available == 0 or wanted > available:
        raise ServeError(f"--accelerator cuda --devices {devices}: this machine has {available} GPU(s); use "
                         "--accelerator cpu, or fewer --devices")
    return "cuda", wanted


def build_server(args: SimpleNamespace) -> ls.LitServer:
    """The LitServer of the checkpoint: the batched predict route, the upload rules and the page at GET /."""
    check_options(args)
    accelerator, devices = resolve_devices(args.accelerator, args.devices)
    module = load_module(args.ckpt_path)  # a bad checkpoint is one line here, not a dead worker later
    config = module.data_config
    if config is None:
        raise ServeError(f"--ckpt_path {args.ckpt_path} stores no data config (preprocessing and classes); serve a "
                         "checkpoint written by `convmixer fit`")
    names = module.class_names
    described = f"{Path(args.ckpt_path).name}: {len(names)} classes, {'×'.join(map(str, config.input_size))} input"
    api = ConvMixerAPI(args.ckpt_path, args.top_k, args.max_batch_size, args.batch_timeout, args.workers_per_device)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=args.workers_per_device,
                          model_metadata={"checkpoint": str(args.ckpt_path), "class_names": names,
                                          "data_config": config.pretrained_cfg(),
                                          "top_k": min(args.top_k, len(names))})
    server.app.state.upload_rules = UploadRules(config.pil_mode, config.image_transform(), args.max_bytes,
                                                PixelBudget(args.decode_pixels))
    # GET / is the page instead of LitServe's "litserve running" (the health check is GET /health)
    router = server.app.router
    router.routes = [route for route in router.routes
                     if not (getattr(route, "path", None) == "/" and "GET" in getattr(route, "methods", ()))]
    content = page(described)

    @server.app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(content)

    return server


def serve(ckpt_path: str, host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1", port: int = 8000,
          top_k: int = 5, max_batch_size: int = 8, batch_timeout: float = 0.01, max_bytes: int = 20 * 2**20,
          decode_pixels: int = 120_000_000, accelerator: Literal["auto", "cpu", "cuda"] = "auto", devices: str = "auto",
          workers_per_device: int = 1, log_level: Literal["debug", "info", "warning", "error"] = "info") -> None:
    """Serve a checkpoint over HTTP (LitServe): POST an image to /predict, or open the page at / in a browser.

    Args:
        ckpt_path: Checkpoint written by `convmixer fit`.
        host: Address to listen on (127.0.0.1: this machine only; 0.0.0.0 or :: for every one).
        port: Port (1024-65535).
        top_k: Classes per answer.
        max_batch_size: Most requests run in one forward pass (1: no batching).
        batch_timeout: Seconds a worker waits to fill a batch.
        max_bytes: Largest image file accepted, in bytes; larger uploads get a 413.
        decode_pixels: Most pixels decoded at once across uploads (bounds the server's memory: about 4 bytes a
            pixel); a larger image waits until it is decoded alone.
        accelerator: Where the model runs (auto: a GPU if there is one).
        devices: Number of GPUs, one inference process each (auto: all).
        workers_per_device: Inference processes per device.
        log_level: LitServe and uvicorn logging (info logs every request).
    """
    args = SimpleNamespace(**locals())
    server = build_server(args)
    try:  # which port is taken, in one line before LitServe starts its worker processes
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from err
    # everything below is inherited by the HTTP process that LitServe forks, which decodes uploads in threads:
    # PIL only warns between its pixel limit and twice it, and a warning filter is process-wide
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    torch.set_num_threads(1)  # the HTTP process crops one image per thread; the model runs in the workers
    if _LIBC is not None:
        # decoded images (megabytes each) get memory of their own from the system and give it back when freed:
        # glibc's default raises its threshold after the first large free and then keeps them in each thread's heap
        _LIBC.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    # SIGTERM (kill, docker stop) stops the server and its workers as Ctrl+C does; the HTTP process LitServe forks
    # inherits the handler, and just exits when uvicorn re-raises the signal there once it has stopped
    server_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() == server_pid:
            raise KeyboardInterrupt
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    say(f"serving {ckpt_path} on http://{'[::1]' if host == '::' else host}:{port}/ (POST /predict, a page at /; "
        f"max_batch_size {max_batch_size}, batch_timeout {batch_timeout} s)")
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
