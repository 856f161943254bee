"""The Open Inference Protocol (KServe v2) REST codec, with the binary data extension.

A request is JSON, or JSON followed by raw tensor bytes when the
``Inference-Header-Content-Length`` header gives the JSON's length; each binary
input then states its ``binary_data_size``. BYTES elements are, in binary form,
a 4-byte little-endian length and the bytes; in JSON, strings (for images:
base64, since JSON cannot hold raw bytes). Responses mirror this: outputs asked
for with ``binary_data`` (or all, with the request parameter
``binary_data_output``) follow the JSON header as raw bytes.

Reference: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol
and Triton's binary_data extension.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("probabilities", "label")


class ProtocolError(ValueError):
    """A request that does not follow the protocol; answered 400 with this message."""


@dataclass
class InferRequest:
    """The parts of an inference request the image classifier uses."""

    id: str | None
    input_name: str
    images: list[bytes]
    outputs: dict[str, bool]  # requested output -> binary
    parameters: dict[str, Any] = field(default_factory=dict)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(
                f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit the {len(body)}-byte body")
        json_part, binary = body[:n], body[n:]
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the inference request header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("the inference request must be a JSON object")
    return header, binary


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("a BYTES element's 4-byte length prefix is cut short")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"a BYTES element of {n} bytes runs past the binary data")
        out.append(raw[pos : pos + n])
        pos += n
    if len(out) != count:
        raise ProtocolError(f"the shape says {count} elements, the binary data holds {len(out)}")
    return out


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _json_elements(data: Any, count: int) -> list[bytes]:
    items = _flatten(data)
    if len(items) != count:
        raise ProtocolError(f"the shape says {count} elements, 'data' holds {len(items)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ProtocolError(f"BYTES element {i} must be a base64 string in JSON")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(
                f"BYTES element {i} is not base64 ({exc}); send raw bytes with the binary "
                "data extension instead"
            ) from exc
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an inference request for a model with one BYTES image input."""
    header, binary = _split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError("'inputs' must hold exactly one tensor: the encoded images (BYTES)")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(
            f"input datatype must be BYTES (encoded image files), got {tensor.get('datatype')!r}"
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input shape must be a list of sizes, got {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    if len(shape) > 1 and any(d != 1 for d in shape[1:]):
        raise ProtocolError(f"input shape must be [N] or [N, 1], got {shape}")
    params = tensor.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise ProtocolError(
                f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header"
            )
        images = _bytes_elements(binary, count)
    elif "data" in tensor:
        if binary:
            raise ProtocolError("binary data follows the header but no input declares it")
        images = _json_elements(tensor["data"], count)
    else:
        raise ProtocolError("the input has neither 'data' nor 'binary_data_size'")
    request_params = header.get("parameters") or {}
    all_binary = bool(request_params.get("binary_data_output", False))
    outputs: dict[str, bool] = {}
    requested = header.get("outputs")
    if requested:
        for out in requested:
            name = out.get("name") if isinstance(out, dict) else None
            if name not in OUTPUTS:
                raise ProtocolError(f"unknown output {name!r}; this model has {list(OUTPUTS)}")
            binary_out = (out.get("parameters") or {}).get("binary_data", all_binary)
            outputs[name] = bool(binary_out)
    else:
        outputs = {name: all_binary for name in OUTPUTS}
    request_id = header.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        input_name=str(tensor.get("name", "image")),
        images=images,
        outputs=outputs,
        parameters=request_params,
    )


def _bytes_payload(values: list[str]) -> bytes:
    parts = []
    for value in values:
        raw = value.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def encode_response(
    request: InferRequest,
    *,
    model_name: str,
    model_version: str,
    probabilities: np.ndarray,
    labels: list[str],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` if binary)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in request.outputs.items():
        if name == "probabilities":
            tensor: dict[str, Any] = {
                "name": name,
                "datatype": "FP32",
                "shape": list(probabilities.shape),
            }
            raw = np.ascontiguousarray(probabilities, dtype="<f4").tobytes()
            data: list = probabilities.reshape(-1).tolist()
        else:
            tensor = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
            raw = _bytes_payload(labels)
            data = list(labels)
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    header: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": outputs,
    }
    if request.id is not None:
        header["id"] = request.id
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {
        HEADER_LENGTH: str(len(head)),
        "Content-Type": "application/octet-stream",
    }
