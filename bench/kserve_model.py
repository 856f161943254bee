"""KServe's Python model server with a custom ``kserve.Model`` doing kaedama's preprocessing.

The peer in ``bench_serve.py``: it runs in its own environment (``.bench/kserve-venv``,
``kserve==0.21.*``) with ``src/`` on PYTHONPATH for :class:`kaedama.preprocess.Preprocess`,
and serves the same exported ONNX model with ONNX Runtime. Requests are KServe's v1
JSON, the way its custom-model examples send images: ``{"instances": [{"b64": ...}]}``.

    .bench/kserve-venv/bin/python bench/kserve_model.py --model_dir DIR --model_name NAME \\
        --http_port 8081
"""

from __future__ import annotations

import argparse
import base64
import json
import os

import kserve
import numpy as np
import onnxruntime as ort

from kaedama.preprocess import Preprocess


class KaedamaOnnxModel(kserve.Model):
    """load / preprocess / predict, as KServe's custom-model docs show."""

    def __init__(self, name: str, model_dir: str, threads: int) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.threads = threads
        self.ready = False
        self.load()

    def load(self) -> bool:
        with open(os.path.join(self.model_dir, "kaedama-model.json")) as fh:
            meta = json.load(fh)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(
            os.path.join(self.model_dir, meta["model_file"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.input = meta["input"]
        self.logits = meta["outputs"]["logits"]
        self.classes = meta["classes"]
        self.preprocess_fn = Preprocess.from_data_config(meta["data_config"])
        self.ready = True
        return self.ready

    def preprocess(self, payload: dict, headers: dict | None = None) -> np.ndarray:
        images = [base64.b64decode(item["b64"]) for item in payload["instances"]]
        return np.stack([self.preprocess_fn(data) for data in images])

    def predict(self, payload: np.ndarray, headers: dict | None = None) -> dict:
        (logits,) = self.session.run([self.logits], {self.input: payload})
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return {"predictions": probs.tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args, _ = parser.parse_known_args()
    model = KaedamaOnnxModel(args.model_name, args.model_dir, args.threads)
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False).start([model])
