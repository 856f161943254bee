"""Serving benchmarks: export runtimes, kaedama's server vs KServe vs the in-process ceiling,
the 300-request burst, raw bytes vs base64 JSON, and the serving image's size.

Subcommands (``all`` runs every one, in one run, on the same exported model and images):

``export``  images/s of ONNX Runtime vs torch eager vs TorchScript at batch sizes.
``load``    closed-loop throughput and p50/p99 at concurrencies 1, 4, 16, 64 for
            kaedama's server (raw bytes) and KServe 0.21's Python model server (a
            custom ``kserve.Model`` with the same preprocessing, v1 base64 JSON; set
            up in ``.bench/kserve-venv`` on first use), loaded by an aiohttp load
            generator, by ``hey`` when installed (``apt-get install hey``) and by
            kaedama's own client; the in-process ceiling (ONNX Runtime batched, the
            same preprocessing in threads, no HTTP); then the burst: 300 requests at
            once through the retrying client, against 300 / the best throughput.
``bytes``   request bytes and throughput per image: raw body vs base64 JSON (v2 infer).
``size``    installed size of the serving dependencies vs a torch-based serving stack.

Prints a table, then one JSON object. Smoke: ``--size 64 --requests 40 --concurrency 1 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]
WORK = REPO / ".bench" / "serve"
KSERVE_VENV = REPO / ".bench" / "kserve-venv"
KSERVE_REQUIREMENT = "kserve==0.21.*"
SHARED = REPO.parent / "shared" / "datasets" / "hymenoptera"


# --------------------------------------------------------------------------- setup


def cores() -> int:
    return len(os.sched_getaffinity(0))


def prepare_model(model: str, size: int, classes: int) -> Path:
    """A random-init ``model`` checkpoint exported to ONNX (cached under .bench/serve)."""
    out = WORK / f"{model}-{size}-{classes}"
    if (out / "kaedama-model.json").exists():
        return out
    import torch

    from kaedama.serve.config import ExportConfig
    from kaedama.serve.export import export_model
    from kaedama.train.model import TrainedModel, create_model, resolve_data_config

    torch.manual_seed(0)
    net = create_model(model, classes).eval()
    trained = TrainedModel(
        net, tuple(f"class_{i}" for i in range(classes)), resolve_data_config(net, size), model, {}
    )
    export_model(trained, str(out), ExportConfig(name="bench", version="1"), source="random")
    return out


def load_images(n: int) -> tuple[list[bytes], str]:
    """``n`` real photos from hymenoptera when present, else generated 500x375 JPEGs."""
    if SHARED.is_dir():
        files = sorted(p for p in SHARED.rglob("*.jpg"))[:n]
        if len(files) >= n:
            return [p.read_bytes() for p in files], f"hymenoptera ({n} photos)"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        buf = io.BytesIO()
        coarse.resize((500, 375), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, f"generated 500x375 JPEGs ({n})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, env: dict | None = None) -> Iterator[None]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_http(ready_url, proc)
            yield
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def kaedama_server(model_dir: Path, **fields) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kaedama", "serve", str(model_dir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    for key, value in fields.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    url = f"http://127.0.0.1:{port}"
    with process(cmd, url + "/v2/health/ready", env):
        yield url


def ensure_kserve_venv() -> Path:
    python = KSERVE_VENV / "bin" / "python"
    if not python.exists():
        print(f"setting up {KSERVE_VENV} with {KSERVE_REQUIREMENT} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", KSERVE_REQUIREMENT, "onnxruntime",
             "numpy", "pillow", "pyyaml"],
            check=True,
        )  # fmt: skip
    return python


@contextlib.contextmanager
def kserve_server(model_dir: Path, name: str) -> Iterator[str]:
    python = ensure_kserve_venv()
    port = free_port()
    cmd = [str(python), str(REPO / "bench" / "kserve_model.py"), "--model_dir", str(model_dir)]
    cmd += ["--model_name", name, "--http_port", str(port), "--enable_latency_logging", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    url = f"http://127.0.0.1:{port}"
    with process(cmd, url + f"/v1/models/{name}", env):
        yield url


# --------------------------------------------------------------------------- load


def summary(latencies: list[float], elapsed: float, statuses: dict[int, int]) -> dict:
    lat = sorted(latencies)
    ok = statuses.get(200, 0)

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

    return {
        "req_per_s": round(ok / elapsed, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


async def closed_loop(url: str, bodies: list[bytes], headers: dict, concurrency: int, n: int):
    """``concurrency`` workers POSTing back to back until ``n`` requests are done."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                latencies.append(time.perf_counter() - started)
                statuses[r.status] = statuses.get(r.status, 0) + 1

        # warm the connections
        await asyncio.gather(*(worker() for _ in range(1)))
        latencies.clear()
        statuses.clear()
        counter = iter(range(n))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - started, statuses)


def client_loop(url: str, images: list[bytes], concurrency: int, n: int) -> dict:
    """kaedama's own AsyncClient, ``concurrency`` in flight."""
    from kaedama.client import AsyncClient, ClientConfig, Prediction

    async def run():
        async with AsyncClient(url, ClientConfig(concurrency=concurrency)) as client:
            await client.predict_many(images[:concurrency])
            started = time.perf_counter()
            results = await client.predict_many([images[i % len(images)] for i in range(n)])
            return results, time.perf_counter() - started

    results, elapsed = asyncio.run(run())
    ok = sum(isinstance(r, Prediction) for r in results)
    return {"req_per_s": round(ok / elapsed, 2), "failures": n - ok}


def hey_loop(url: str, body: bytes, content_type: str, concurrency: int, n: int) -> dict | None:
    hey = shutil.which("hey")
    if hey is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".body") as fh:
        fh.write(body)
        fh.flush()
        out = subprocess.run(
            [hey, "-n", str(n), "-c", str(concurrency), "-m", "POST", "-T", content_type,
             "-D", fh.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50% in ([\d.]+) secs", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    codes = {k: int(v) for k, v in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = sum(int(x) for x in re.findall(r"^\s+\[(\d+)\]\s+(?:Post|Get) ", out, re.M))
    if errors:
        codes["transport_errors"] = errors
    return {
        "req_per_s": round(rps, 2),
        "p50_ms": round(1000 * float(p50.group(1)), 1) if p50 else None,
        "p99_ms": round(1000 * float(p99.group(1)), 1) if p99 else None,
        "statuses": codes,
    }


def in_process_ceiling(model_dir: Path, images: list[bytes], n: int, batch: int) -> dict:
    """ONNX Runtime batched with the same preprocessing in threads: no HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    from kaedama.serve.config import ServeConfig
    from kaedama.serve.model import ImageClassifier

    model = ImageClassifier(str(model_dir), ServeConfig(max_batch_size=batch, warmup_batches=2))
    model.load()
    items = [images[i % len(images)] for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(cores()) as pool:
        pending = []
        for array in pool.map(model.preprocess, items):
            pending.append(array)
            if len(pending) == batch:
                model.probabilities(model.predict(np.stack(pending), False)[0])
                pending = []
        if pending:
            model.probabilities(model.predict(np.stack(pending), False)[0])
    return {"img_per_s": round(n / (time.perf_counter() - started), 2)}


def burst(url: str, images: list[bytes], n: int) -> dict:
    from kaedama.client import AsyncClient, ClientConfig, Prediction

    async def run():
        async with AsyncClient(url, ClientConfig(concurrency=n)) as client:
            started = time.perf_counter()
            results = await client.predict_many([images[i % len(images)] for i in range(n)])
            return results, time.perf_counter() - started

    results, elapsed = asyncio.run(run())
    ok = [r for r in results if isinstance(r, Prediction)]
    return {
        "requests": n,
        "seconds": round(elapsed, 2),
        "failures": n - len(ok),
        "attempts_max": max((r.attempts for r in ok), default=0),
        "attempts_mean": round(statistics.mean(r.attempts for r in ok), 2) if ok else None,
    }


def v1_json(image: bytes) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()


def v2_json(image: bytes) -> bytes:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1]}
    tensor["data"] = [base64.b64encode(image).decode()]
    return json.dumps({"inputs": [tensor]}).encode()


def run_load(args, model_dir: Path, images: list[bytes]) -> dict:
    config = {
        "max_batch_size": args.max_batch_size,
        "max_batch_wait_ms": args.max_batch_wait_ms,
        "max_queue": args.max_queue,
    }
    raw = {"Content-Type": "application/octet-stream"}
    js = {"Content-Type": "application/json"}
    result: dict = {"config": config, "kaedama": {}, "kserve": {}, "kaedama_client": {}}
    result["ceiling"] = in_process_ceiling(model_dir, images, args.requests, args.max_batch_size)
    with kaedama_server(model_dir, **config) as url:
        for c in args.concurrency:
            row = {
                "aiohttp": asyncio.run(closed_loop(url + "/predict", images, raw, c, args.requests))
            }
            row["hey"] = hey_loop(
                url + "/predict", images[0], raw["Content-Type"], c, args.requests
            )
            result["kaedama"][str(c)] = row
            result["kaedama_client"][str(c)] = client_loop(url, images, c, args.requests)
        best = max(r["aiohttp"]["req_per_s"] for r in result["kaedama"].values())
        result["burst"] = burst(url, images, args.burst)
        result["burst"]["ideal_seconds"] = round(args.burst / best, 2)
        result["burst"]["ratio_to_ideal"] = round(result["burst"]["seconds"] * best / args.burst, 2)
    if args.kserve:
        bodies = [v1_json(b) for b in images]
        with kserve_server(model_dir, "bench") as url:
            for c in args.concurrency:
                path = url + "/v1/models/bench:predict"
                row = {"aiohttp": asyncio.run(closed_loop(path, bodies, js, c, args.requests))}
                row["hey"] = hey_loop(path, bodies[0], js["Content-Type"], c, args.requests)
                result["kserve"][str(c)] = row
    return result


# --------------------------------------------------------------------------- other modes


def run_export(args, model_dir: Path, images: list[bytes]) -> dict:
    """images/s of ONNX Runtime, torch eager and TorchScript on preprocessed batches."""
    import onnxruntime as ort
    import torch

    from kaedama.serve.artifact import load_artifact
    from kaedama.train.model import create_model

    torch.set_num_threads(cores())
    artifact = load_artifact(str(model_dir))
    pre = artifact.preprocess
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    session = ort.InferenceSession(
        artifact.model_bytes, options, providers=["CPUExecutionProvider"]
    )
    torch.manual_seed(0)
    net = create_model(args.model, len(artifact.classes)).eval()
    with torch.inference_mode():
        scripted = torch.jit.freeze(torch.jit.trace(net, torch.zeros(1, *pre.input_size)))
    runners = {
        "onnxruntime": lambda x: session.run([artifact.logits_output], {artifact.input_name: x}),
        "torch_eager": lambda x: net(torch.from_numpy(x)),
        "torchscript": lambda x: scripted(torch.from_numpy(x)),
    }
    out: dict = {}
    for batch in args.batch:
        x = pre.batch([images[i % len(images)] for i in range(batch)])
        row = {}
        for name, run in runners.items():
            times = []
            with torch.inference_mode():
                run(x)
                for _ in range(args.runs):
                    started = time.perf_counter()
                    run(x)
                    times.append(time.perf_counter() - started)
            row[name] = round(batch / statistics.median(times), 1)
        out[str(batch)] = row
    return out


def run_bytes(args, model_dir: Path, images: list[bytes]) -> dict:
    sizes = {
        "raw_bytes": statistics.mean(len(b) for b in images),
        "base64_json_v2": statistics.mean(len(v2_json(b)) for b in images),
    }
    bodies = [v2_json(b) for b in images]
    c = 16
    with kaedama_server(model_dir, max_queue=args.max_queue) as url:
        raw = asyncio.run(
            closed_loop(url + "/predict", images, {"Content-Type": "image/jpeg"}, c, args.requests)
        )
        js = asyncio.run(closed_loop(url + "/v2/models/bench/infer", bodies, {}, c, args.requests))
    return {
        "mean_request_bytes": {k: round(v) for k, v in sizes.items()},
        "base64_overhead": round(sizes["base64_json_v2"] / sizes["raw_bytes"] - 1, 3),
        "concurrency": c,
        "raw_bytes": raw,
        "base64_json_v2": js,
    }


def _closure(requirements: list[str]) -> set[str]:
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for sub in dist.requires or []:
            r = Requirement(sub)
            extras = req.extras or {""}
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras):
                todo.append(r)
    return seen


def _installed_mb(names: set[str]) -> float:
    from importlib import metadata

    total = 0
    for name in names:
        for f in metadata.distribution(name).files or []:
            with contextlib.suppress(OSError):
                total += f.locate().stat().st_size
    return round(total / 2**20, 1)


def run_size(args) -> dict:
    """Installed size of the serving stack's dependency closure (from this environment)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = project["dependencies"]
    extras = project["optional-dependencies"]
    serve = _closure(core + extras["serve"])
    torch_serving = _closure(core + extras["serve"] + extras["train"])
    return {
        "kaedama_serve_mb": _installed_mb(serve),
        "torch_based_mb": _installed_mb(torch_serving),
        "serve_packages": len(serve),
        "note": "site-packages bytes of the dependency closure; the python:3.11-slim base adds ~150 MB to both",
    }


# --------------------------------------------------------------------------- main


def table(result: dict) -> str:
    lines = []
    load = result.get("load")
    if load:
        lines.append(f"in-process ceiling: {load['ceiling']['img_per_s']} img/s")
        lines.append("server   tool      conc  req/s    p50 ms   p99 ms  statuses")
        for server in ("kaedama", "kserve"):
            for c, row in load[server].items():
                for tool, r in row.items():
                    if r:
                        lines.append(
                            f"{server:8} {tool:8} {c:>5} {r['req_per_s']:>7} {r['p50_ms']!s:>9} "
                            f"{r['p99_ms']!s:>8}  {r['statuses']}"
                        )
        for c, r in load["kaedama_client"].items():
            lines.append(f"kaedama  client   {c:>5} {r['req_per_s']:>7}  failures {r['failures']}")
        b = load["burst"]
        lines.append(
            f"burst {b['requests']}: {b['seconds']} s (ideal {b['ideal_seconds']} s, "
            f"x{b['ratio_to_ideal']}), failures {b['failures']}, attempts max {b['attempts_max']}"
        )
    if "export" in result:
        for batch, row in result["export"].items():
            lines.append(
                f"export batch {batch}: " + ", ".join(f"{k} {v} img/s" for k, v in row.items())
            )
    if "bytes" in result:
        b = result["bytes"]
        lines.append(
            f"bytes/request raw {b['mean_request_bytes']['raw_bytes']} vs base64 JSON "
            f"{b['mean_request_bytes']['base64_json_v2']} (+{100 * b['base64_overhead']:.0f}%); "
            f"req/s {b['raw_bytes']['req_per_s']} vs {b['base64_json_v2']['req_per_s']}"
        )
    if "size" in result:
        s = result["size"]
        lines.append(
            f"serving deps {s['kaedama_serve_mb']} MB vs torch-based {s['torch_based_mb']} MB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["export", "load", "bytes", "size", "all"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224, help="input size in px")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="distinct images to send")
    parser.add_argument("--requests", type=int, default=400, help="requests per load point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="export mode")
    parser.add_argument("--runs", type=int, default=5, help="export mode repeats")
    parser.add_argument("--no-kserve", dest="kserve", action="store_false")
    args = parser.parse_args(argv)

    result: dict = {"machine": {"cores": cores()}, "model": f"{args.model}@{args.size}px"}
    model_dir = images = None
    if args.mode != "size":
        model_dir = prepare_model(args.model, args.size, args.classes)
        images, source = load_images(args.images)
        result["images"] = source
    if args.mode in ("export", "all"):
        result["export"] = run_export(args, model_dir, images)
    if args.mode in ("load", "all"):
        result["load"] = run_load(args, model_dir, images)
    if args.mode in ("bytes", "all"):
        result["bytes"] = run_bytes(args, model_dir, images)
    if args.mode in ("size", "all"):
        result["size"] = run_size(args)
    print(table(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
