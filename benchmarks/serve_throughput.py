"""Requests/s of `convmixer serve` at a few client concurrencies and server --max_batch_size values, against
`convmixer predict` on a folder of the same images.

    python benchmarks/serve_throughput.py --ckpt_path checkpoints/digits/last.ckpt --requests 512 \\
        --concurrency 1 4 16 64 --max_batch_size 1 8 32
    python benchmarks/serve_throughput.py --ckpt_path X --requests 8 --concurrency 1 2 --max_batch_size 4  # tiny

For each --max_batch_size it starts the server on a free loopback port, sends --requests uploads (one image each,
raw bytes) from a pool of --concurrency threads, each keeping one HTTP connection open, after a warm-up round, and
prints requests/s (= images/s, one image per request), the median and 95th percentile latency and the mean batch
size the server reported. Then it times `convmixer predict` over the same images, wall time of the whole command
(start-up included), and its images/s. Without --images, --requests random RGB images of 1.25x the model's input
size are written to a temporary folder (so every request decodes, resizes and crops, as a real upload would).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from convmixer_pl.checkpoints import load_module
from convmixer_pl.data.images import find_images


def convmixer() -> str:
    beside = Path(sys.executable).parent / "convmixer"
    return str(beside) if beside.is_file() else (shutil.which("convmixer") or "convmixer")


def write_images(folder: Path, count: int, ckpt_path: str) -> list[Path]:
    """`count` random RGB PNGs a little larger than the model's input, so the server resizes and crops each."""
    size = load_module(ckpt_path).data_config["input_size"][1]
    side = max(8, round(1.25 * size))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"image_{i:05d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(path)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(ckpt_path: str, port: int, options: list[str], log) -> subprocess.Popen:
    command = [convmixer(), "serve", "--ckpt_path", ckpt_path, "--port", str(port), "--log_level", "warning",
               *options]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"convmixer serve exited with {process.returncode}: {tail(log.name)}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"convmixer serve did not answer /health within 300 s: {tail(log.name)}")


def tail(path: str) -> str:
    return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-5:])


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # the server stops its worker processes
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Client:
    """One keep-alive HTTP connection per thread; `post` returns (seconds, batch size the server reported)."""

    def __init__(self, port: int) -> None:
        self.port, self.local = port, threading.local()

    def post(self, data: bytes) -> tuple[float, int]:
        if not hasattr(self.local, "connection"):
            self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        start = time.perf_counter()
        self.local.connection.request("POST", "/predict", body=data, headers={"Content-Type": "image/png"})
        response = self.local.connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"POST /predict answered {response.status}: {body[:300]!r}")
        return seconds, json.loads(body)["batch_size"]


def measure(port: int, payloads: list[bytes], requests: int, concurrency: int) -> dict:
    client = Client(port)
    sent = [payloads[i % len(payloads)] for i in range(requests)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client.post, sent[: max(concurrency, min(requests, 2 * concurrency))]))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(client.post, sent))
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    return {"requests": requests, "seconds": wall, "requests_per_s": requests / wall,
            "p50_ms": 1e3 * statistics.median(latencies),
            "p95_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "mean_batch": statistics.fmean(batch for _, batch in results)}


def time_predict(ckpt_path: str, folder: Path, accelerator: str, batch_size: int, work: Path) -> float:
    command = [convmixer(), "predict", "--ckpt_path", ckpt_path, "--data", str(folder),
               "--data.batch_size", str(batch_size), "--predictions.output", str(work / "predictions.csv"),
               "--trainer.default_root_dir", str(work), "--trainer.enable_progress_bar", "false",
               "--trainer.accelerator", accelerator, "--trainer.devices", "1"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"convmixer predict failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--images", help="folder of images to send (cycled); default: --requests generated ones")
    p.add_argument("--requests", type=int, default=512, help="timed requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="client threads")
    p.add_argument("--max_batch_size", type=int, nargs="+", default=[1, 8, 32], help="server --max_batch_size")
    p.add_argument("--batch_timeout", type=float, default=0.01, help="server --batch_timeout")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--predict_batch_size", type=int, default=64, help="--data.batch_size of convmixer predict")
    args = p.parse_args(argv)
    args.ckpt_path = str(Path(args.ckpt_path).resolve())  # convmixer predict runs in a temporary folder

    work = Path(tempfile.mkdtemp(prefix="serve_throughput_"))
    try:
        folder = Path(args.images) if args.images else work / "images"
        paths = find_images(folder) if args.images else write_images(folder, args.requests, args.ckpt_path)
        if not paths:
            raise SystemExit(f"--images {folder}: no images in it")
        payloads = [path.read_bytes() for path in paths]
        print(f"{args.ckpt_path}: {len(paths)} images, {args.requests} requests per row, accelerator "
              f"{args.accelerator}, batch_timeout {args.batch_timeout} s")
        print(f"{'max_batch_size':>14} {'concurrency':>11} {'requests/s':>10} {'images/s':>9} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'mean batch':>10}")
        for max_batch_size in args.max_batch_size:
            port = free_port()
            with open(work / f"serve_{max_batch_size}.log", "w") as log:
                server = start_server(args.ckpt_path, port, ["--max_batch_size", str(max_batch_size),
                                                             "--batch_timeout", str(args.batch_timeout),
                                                             "--accelerator", args.accelerator], log)
                try:
                    for concurrency in args.concurrency:
                        row = measure(port, payloads, args.requests, concurrency)
                        print(f"{max_batch_size:>14} {concurrency:>11} {row['requests_per_s']:>10.1f} "
                              f"{row['requests_per_s']:>9.1f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
                              f"{row['mean_batch']:>10.2f}", flush=True)
                finally:
                    stop_server(server)
        wall = time_predict(args.ckpt_path, folder, args.accelerator, args.predict_batch_size, work)
        print(f"convmixer predict: {len(paths)} images in {wall:.1f} s wall (start-up included), "
              f"{len(paths) / wall:.1f} images/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
