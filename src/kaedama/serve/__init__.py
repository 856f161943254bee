"""Export a trained model and serve it over HTTP without torch.

* :mod:`.export` (needs torch): a checkpoint -> a serving artifact folder (ONNX by
  default, TorchScript on request) with ``kaedama-model.json`` (classes, data config,
  version, temperature, CAM head, sha256 of every file).
* :mod:`.artifact` reads and verifies that folder with NumPy only.
* :mod:`.model` is the served model in KServe's custom-model shape
  (``load`` / ``preprocess`` / ``predict`` / ``explain``; ready only after load).
* :mod:`.batching` holds the bounded queue, the micro-batcher and the drain-rate
  meter that computes Retry-After; :mod:`.app` the Starlette routes (Open Inference
  Protocol v2, the plain raw-bytes endpoint, explain, health, metrics);
  :mod:`.server` runs it on uvicorn with graceful SIGTERM draining.

The serving modules import no torch and no timm (``tests/test_serve_layering``).
"""
