"""Image embeddings on Apache Beam with RunInference: ``EmbedImages``, a PTransform.

Wires the core's pieces into Beam's model-serving transform: read and preprocess
each image with :class:`kaedama.preprocess.Preprocess` (the model's own data config,
the same pixels as ``kaedama clean``), then ``RunInference`` with a
``KeyedModelHandler`` over ``PytorchModelHandlerTensor``, which batches elements,
loads the model once per worker and shares it between threads. The backbone comes
from :func:`kaedama.clean.embed.embedding_network` and its weights from a state-dict
file written by :func:`kaedama.clean.embed.save_weights` (local or ``gs://``), so
workers never need the model hub.

Input: a PCollection of image URIs. Outputs (a dict of PCollections):

* ``embeddings``: ``(uri, sha256, vector)`` with ``vector`` a float32 NumPy array;
* ``failed``: ``(uri, reason, message)`` for images that cannot be read or decoded.

Vectors equal ``EmbeddingModel.embed`` on the same bytes (tested on the DirectRunner),
so they may go into the same :class:`kaedama.clean.embedcache.EmbeddingCache`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
from apache_beam.pvalue import TaggedOutput

from kaedama import storage
from kaedama.clean.embed import embedding_network
from kaedama.images import ImageError
from kaedama.preprocess import Preprocess

FAILED = "failed"
UNREADABLE = "unreadable"


class _Preprocess(beam.DoFn):
    """uri -> ((uri, sha256), CHW tensor); unreadable or undecodable images to ``failed``."""

    def __init__(self, data_config: dict[str, Any]):
        self._data_config = data_config
        self._preprocess: Preprocess | None = None

    def setup(self) -> None:
        self._preprocess = Preprocess.from_data_config(self._data_config)

    def process(self, uri: str) -> Iterator[Any]:
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as exc:
            yield TaggedOutput(FAILED, (uri, UNREADABLE, str(exc)))
            return
        try:
            array = self._preprocess(data, uri=uri)
        except ImageError as exc:
            yield TaggedOutput(FAILED, (uri, exc.reason, exc.message))
            return
        yield (uri, hashlib.sha256(data).hexdigest()), torch.from_numpy(array)


def _to_numpy(element: tuple[tuple[str, str], PredictionResult]) -> tuple[str, str, np.ndarray]:
    (uri, sha), result = element
    return uri, sha, result.inference.detach().float().numpy()


class EmbedImages(beam.PTransform):
    """Embed images with a timm backbone through RunInference (see the module docstring).

    Args:
        model_name: the timm model name.
        data_config: its preprocessing config (``EmbeddingModel.data_config``).
        state_dict_path: the weights, written by :func:`kaedama.clean.embed.save_weights`.
        batch_size: the largest batch RunInference forms.
    """

    def __init__(
        self,
        model_name: str,
        data_config: dict[str, Any],
        state_dict_path: str,
        *,
        batch_size: int = 32,
    ):
        super().__init__()
        self._data_config = dict(data_config)
        self._handler = KeyedModelHandler(
            PytorchModelHandlerTensor(
                state_dict_path=state_dict_path,
                model_class=embedding_network,
                model_params={"name": model_name},
                device="CPU",
                max_batch_size=batch_size,
            )
        )

    def expand(self, uris: beam.PCollection) -> dict[str, beam.PCollection]:
        inputs = uris | "Preprocess" >> beam.ParDo(_Preprocess(self._data_config)).with_outputs(
            FAILED, main="ok"
        )
        embeddings = (
            inputs.ok
            | "RunInference" >> RunInference(self._handler)
            | "ToNumpy" >> beam.Map(_to_numpy)
        )
        return {"embeddings": embeddings, FAILED: inputs[FAILED]}
