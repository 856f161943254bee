"""The prediction service over real HTTP: protocols, agreement with torch, bad input, metrics.

One ``kaedama serve`` process (a real uvicorn on loopback) serves the exported tiny
resnet18 for the whole module; lifecycle, auth and the burst have their own files.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.plugins.serving import CLASSES, photo, run_server

MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(serving_model):
    with run_server(
        serving_model, max_body_bytes=MAX_BODY, read_timeout_s=1.5, max_pixels=4_000_000
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def expected(serving_expected):
    return serving_expected


def _probs(predictions: list[dict]) -> np.ndarray:
    by_label = {p["label"]: p["score"] for p in predictions}
    return np.array([by_label[c] for c in CLASSES])


def test_health_and_metadata(server):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2/models/tiny").json()
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    assert meta["parameters"]["classes"] == list(CLASSES)
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert httpx.get(server.url + "/v2/models/tiny/ready").status_code == 200
    assert httpx.get(server.url + "/v2/models/tiny/versions/7/ready").status_code == 200
    assert httpx.get(server.url + "/v1/models/tiny").json() == {"name": "tiny", "ready": True}
    assert "binary_tensor_data" in httpx.get(server.url + "/v2").json()["extensions"]


def test_plain_predict_matches_in_process_torch(server, serving_images, expected):
    for i, image in enumerate(serving_images):
        for path in ("/predict", "/v1/models/tiny:predict"):
            r = httpx.post(
                server.url + path,
                content=image,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "tiny" and body["model_version"] == "7"
            scores = [p["score"] for p in body["predictions"]]
            assert scores == sorted(scores, reverse=True)
            assert len(scores) == len(CLASSES)
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(_probs(body["predictions"]), expected[i], atol=1e-5)
    # The tiny model is not degenerate: images disagree on their top class.
    assert len({int(np.argmax(p)) for p in expected}) > 1


def test_top_k_threshold_and_multipart(server, serving_images, expected):
    image = serving_images[0]
    r = httpx.post(server.url + "/predict?top_k=2", content=image)
    assert [p["label"] for p in r.json()["predictions"]] == [
        CLASSES[i] for i in np.argsort(-expected[0])[:2]
    ]
    cut = float(np.sort(expected[0])[-2]) - 1e-6  # keeps exactly the top two
    r = httpx.post(server.url + f"/predict?threshold={cut}", content=image)
    assert len(r.json()["predictions"]) == 2
    r = httpx.post(
        server.url + "/v1/models/tiny:predict",
        files={"file": ("写真 1.jpg", image, "image/jpeg")},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_probs(r.json()["predictions"]), expected[0], atol=1e-5)
    bad = httpx.post(server.url + "/predict?top_k=-1", content=image)
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]


def test_open_inference_protocol_json_and_binary(server, serving_images, expected):
    url = server.url + "/v2/models/tiny/infer"
    request = {
        "id": "r1",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [3],
                "data": [base64.b64encode(b).decode() for b in serving_images[:3]],
            }
        ],
    }
    r = httpx.post(url, json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "r1" and body["model_name"] == "tiny" and body["model_version"] == "7"
    outputs = {o["name"]: o for o in body["outputs"]}
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    np.testing.assert_allclose(probs, expected[:3], atol=1e-5)
    assert outputs["label"]["data"] == [CLASSES[i] for i in expected[:3].argmax(1)]

    # The binary data extension: raw image bytes after the JSON header, binary outputs back.
    raw = b"".join(struct.pack("<I", len(b)) + b for b in serving_images)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(serving_images), 1],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    r = httpx.post(
        url,
        content=head + raw,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == len(r.content) - n
    probs = np.frombuffer(r.content[n:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_calls_infer(server, serving_images, expected, binary):
    """NVIDIA's tritonclient[http], a client nobody here wrote, against /v2/models/NAME/infer."""
    tritonclient = pytest.importorskip("tritonclient.http")
    client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("tiny")
    items = serving_images if binary else [base64.b64encode(b) for b in serving_images]
    tensor = np.array(items, dtype=np.object_)
    inp = tritonclient.InferInput("image", [len(items)], "BYTES")
    inp.set_data_from_numpy(tensor, binary_data=binary)
    outputs = [
        tritonclient.InferRequestedOutput("probabilities", binary_data=binary),
        tritonclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("tiny", [inp], outputs=outputs, request_id="t1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [CLASSES[i] for i in expected.argmax(1)]
    assert result.get_response()["model_version"] == "7"
    client.close()


def _torch_cam(checkpoint, image: bytes, class_index: int) -> np.ndarray:
    """The CAM of ``class_index`` computed with torch from the checkpoint (ReLU, max-scaled)."""
    import torch

    from kaedama.preprocess import Preprocess
    from kaedama.train.model import load_trained

    trained = load_trained(str(checkpoint))
    x = torch.from_numpy(Preprocess.from_data_config(trained.data_config)(image))[None]
    with torch.inference_mode():
        features = trained.model.forward_features(x)[0]
        weight = trained.model.get_classifier().weight[class_index]
        grid = torch.relu(torch.einsum("c,chw->hw", weight, features)).numpy()
    return grid / grid.max() if grid.max() > 0 else grid


def test_explain_png_and_json(server, serving_images, expected, serving_checkpoint):
    image = serving_images[3]
    r = httpx.post(server.url + "/v1/models/tiny:explain", content=image)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    heat = Image.open(io.BytesIO(r.content))
    assert heat.size == (64, 64) and heat.mode == "RGB"
    top = CLASSES[int(expected[3].argmax())]
    from urllib.parse import unquote

    assert unquote(r.headers["X-Kaedama-Class"]) == top
    r = httpx.post(server.url + "/explain?format=json&class=三田本店", content=image)
    body = r.json()
    assert body["class"] == "三田本店"
    assert body["score"] == pytest.approx(expected[3][2], abs=1e-5)
    grid = np.array(body["grid"])
    np.testing.assert_allclose(grid, _torch_cam(serving_checkpoint, image, 2), atol=1e-3)
    top_index = int(expected[3].argmax())
    body = httpx.post(server.url + "/explain?format=json", content=image).json()
    assert body["class"] == CLASSES[top_index]
    np.testing.assert_allclose(
        body["grid"], _torch_cam(serving_checkpoint, image, top_index), atol=1e-3
    )
    r = httpx.post(server.url + "/explain?class=wasps", content=image)
    assert r.status_code == 400 and "wasps" in r.json()["error"]


def _bomb_png(side: int = 30_000) -> bytes:
    """A PNG whose header claims side x side pixels (the decoder refuses it from the header)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"", "application/octet-stream", 400, "empty"),
        (b"hello, this is text", "application/octet-stream", 415, "not_an_image"),
        ("truncated", "image/jpeg", 400, "truncated"),
        ("bomb", "image/png", 413, "too_large"),
        ("jpeg", "application/json", 415, "content_type"),
        ("big", "application/octet-stream", 413, "too_big"),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, body, content_type, status, reason):
    jpeg = photo(120, 90, 5)
    body = {
        "truncated": jpeg[: len(jpeg) // 2],
        "bomb": _bomb_png(),
        "jpeg": jpeg,
        "big": b"\xff" * (MAX_BODY + 10),
    }.get(body, body)
    r = httpx.post(server.url + "/predict", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    error = r.json()
    assert error["reason"] == reason and len(error["error"]) > 10


def test_protocol_errors_and_unknown_names(server, serving_images):
    url = server.url + "/v2/models/tiny/infer"
    cases = [
        (b"{not json", {}, "not JSON"),
        (json.dumps({"inputs": []}).encode(), {}, "exactly one"),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
            ).encode(),
            {},
            "BYTES",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["@@"]}]}
            ).encode(),
            {},
            "base64",
        ),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "does not fit"),
    ]
    for body, headers, words in cases:
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400, (words, r.text)
        assert words in r.json()["error"]
    bad_image = base64.b64encode(b"GIF89a-not-really").decode()
    good = base64.b64encode(serving_images[0]).decode()
    request = {
        "inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [good, bad_image]}]
    }
    r = httpx.post(url, json=request)
    assert r.status_code in (400, 415) and "input element 1" in r.json()["error"]
    for path in ("/v2/models/nope/infer", "/v1/models/nope:predict"):
        r = httpx.post(server.url + path, content=serving_images[0])
        assert r.status_code == 404 and "'tiny'" in r.json()["error"]
    assert httpx.get(server.url + "/v2/models/tiny/versions/8").status_code == 404
    r = httpx.get(server.url + "/v3/anything")
    assert r.status_code == 404 and r.json()["reason"] == "no_route"


def test_slow_client_gets_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"\xff\xd8\xff" + b"\0" * 100
        )
        started = time.monotonic()
        reply = sock.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408"), reply
    assert time.monotonic() - started < 10


def test_metrics_count_requests_batches_and_queue(server, serving_images):
    httpx.post(server.url + "/predict", content=serving_images[0])
    text = httpx.get(server.url + "/metrics").text
    assert 'kaedama_requests_total{code="200",endpoint="predict"}' in text
    for name in (
        "kaedama_request_duration_seconds_bucket",
        "kaedama_batch_size_bucket",
        "kaedama_queue_depth",
        "kaedama_model_ready 1.0",
        "kaedama_drain_rate_images_per_second",
    ):
        assert name in text
    count = [line for line in text.splitlines() if line.startswith("kaedama_images_total")]
    assert float(count[0].split()[-1]) >= 1


def test_predict_command_prints_results_in_order(
    server, serving_images, expected, tmp_path, capsys
):
    from kaedama.cli import main

    paths = []
    for i, data in enumerate(serving_images[:3]):
        path = tmp_path / f"{i}.img"
        path.write_bytes(data)
        paths.append(str(path))
    missing = str(tmp_path / "missing.jpg")
    code = main(
        ["predict", server.url, *paths, missing, "--json", "--top-k", "2", "--model", "tiny"]
    )
    assert code == 1  # one file failed, the others were classified
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["file"] for row in rows] == [*paths, missing]
    for row, probs in zip(rows[:3], expected[:3], strict=True):
        assert row["predictions"][0]["label"] == CLASSES[int(probs.argmax())]
        assert len(row["predictions"]) == 2
    assert "error" in rows[3]
