"""Batch prediction as a Beam job: read -> preprocess -> RunInference -> postprocess -> save.

::

    python -m beam.predict --input gs://b/photos/ --model gs://b/models/v3 \\
        --output gs://b/preds/v3 --runner DataflowRunner --project P --region R \\
        --temp_location gs://b/tmp --sdk_container_image REGISTRY/kaedama-beam:TAG

Steps (named as in a runner's UI)::

    List        the input's image URIs (folder/prefix, manifest or list), in chunks
    Load        read + decode + the model's own preprocessing; bad files -> rejected
    Infer       Beam's RunInference with a model handler for kaedama's exported model
                (batched up to --max_batch_size, one model per worker process)
    Format      all class probabilities per image, most likely first
    WriteShards one JSONL file per (kind, shard), sorted by URI
    Summarise   counts, checked: predicted + rejected = listed

The step functions are :mod:`kaedama.serve.batch`'s, shared with the in-process
engine (``kaedama predict-batch`` without ``--runner``). Every step has one output
and the last step gathers what it needs (the shape Beam's DaskRunner requires; see
``beam/README.md``).

Why a model handler of ours rather than Beam's ``OnnxModelHandlerNumpy``: the exported
model is a folder (model, classes, data config, temperature) whose sha256s are checked
on load, and its probabilities need the exported temperature; the handler loads it with
:func:`kaedama.serve.artifact.load_artifact` and runs the same ONNX Runtime session as
the prediction service.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from beam.common import Gather, run_pipeline
from kaedama import storage
from kaedama.config import ConfigError, add_config_arguments, build_config
from kaedama.errors import KaedamaError
from kaedama.serve.batch import (
    KINDS,
    SUMMARY_NAME,
    BatchPredictConfig,
    BatchPredictError,
    Predictor,
    Unusable,
    chunks,
    list_sources,
    load_example,
    model_summary,
    prediction_record,
    shard_of,
    write_shard,
    write_summary,
)

log = logging.getLogger(__name__)
# Files per listed element: a runner's cost is per element.
CHUNK = 256


class ArtifactModelHandler(ModelHandler):
    """RunInference handler for a ``kaedama export`` folder: arrays in, probabilities out."""

    def __init__(self, model_dir: str, config: BatchPredictConfig) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.config = config

    def load_model(self) -> Predictor:
        return Predictor(self.model_dir, self.config.threads)

    def run_inference(self, batch, model: Predictor, inference_args=None) -> Iterable[Any]:
        return list(model(batch))


class _Load(beam.DoFn):
    """A chunk of URIs -> ``("ok", [(uri, array), ...])`` batches or ``("bad", record)``.

    One output (see the module doc). The batches are made here, and RunInference's own
    batching is off: Beam 2.77's DaskRunner drops what a DoFn emits from
    ``finish_bundle``, where ``BatchElements`` emits each bundle's last, partial batch
    (6 images in batches of 4 came out as 4 predictions there).
    """

    def __init__(self, model_dir: str, config: BatchPredictConfig) -> None:
        self.model_dir = model_dir
        self.config = config

    def setup(self) -> None:
        from kaedama.serve.artifact import read_card

        # The preprocessing only, from the model card: the model file is read and
        # verified once per worker, by RunInference's handler.
        self._preprocess = read_card(self.model_dir).preprocess

    def process(self, chunk: list[str]):
        batch: list[tuple[str, Any]] = []
        for uri in chunk:
            loaded = load_example(uri, self._preprocess, self.config.max_bytes)
            if isinstance(loaded, Unusable):
                yield "bad", loaded.record()
                continue
            batch.append(tuple(loaded))
            if len(batch) == self.config.max_batch_size:
                yield "ok", batch
                batch = []
        if batch:
            yield "ok", batch


def _keyed(record: dict[str, Any], kind: str, shards: int) -> tuple[tuple[str, int], dict]:
    return (kind, shard_of(record["uri"], shards)), record


class _Format(beam.DoFn):
    """``(uri, probabilities)`` -> the output record (class names from the artifact)."""

    def __init__(self, model_dir: str, config: BatchPredictConfig) -> None:
        self.model_dir = model_dir
        self.config = config

    def setup(self) -> None:
        from kaedama.serve.artifact import read_card

        card = read_card(self.model_dir)  # names only: no model bytes
        self._classes, self._version = card.classes, card.version

    def process(self, keyed: tuple[str, Any]):
        uri, probs = keyed
        yield prediction_record(uri, probs, self._classes, self._version, self.config.top_k)


def _records(results: Any) -> Iterable[tuple[str, Any]]:
    """RunInference's output for one pre-made batch: ``(uri, probabilities)`` pairs."""
    return results if isinstance(results, list) else [results]


def _write_shard(item, out: str, shards: int) -> tuple[str, int, dict[str, int]]:
    """Write one shard; ``(kind, records, tally by label or reason)`` for the summary."""
    (kind, shard), records = item
    records = list(records)
    count = write_shard(out, kind, shard, shards, records)
    key = "label" if kind == "predictions" else "reason"
    return kind, count, dict(Counter(r[key] for r in records))


def _summarise(gathered: dict[str, list], out: str, model_dir: str, config) -> dict[str, Any]:
    from kaedama.serve.artifact import read_card

    counts: Counter[str] = Counter()
    by: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for kind, count, tally in gathered["written"]:
        counts[kind] += count
        by[kind].update(tally)
    # Empty shards are written too, so a reader always finds shards x kinds files.
    present = {(k, s) for k, s in gathered["shards"]}
    for kind in KINDS:
        for shard in range(config.shards):
            if (kind, shard) not in present:
                write_shard(out, kind, shard, config.shards, [])
    model = model_summary(read_card(model_dir))
    listed = sum(gathered["listed"])
    return write_summary(
        out, listed, dict(counts), dict(by["predictions"]), dict(by["rejected"]), model, config
    )


class BatchPredict(beam.PTransform):
    """The whole job as one composite: List -> Load -> Infer -> Format -> Write -> Summarise."""

    def __init__(self, source: str, model_dir: str, out: str, config: BatchPredictConfig):
        super().__init__()
        self.source, self.model_dir, self.out, self.config = source, model_dir, out, config

    def expand(self, pbegin):
        config, shards = self.config, self.config.shards
        listed = (
            pbegin
            | "Source" >> beam.Create([self.source])
            | "List" >> beam.FlatMap(lambda src: chunks(list_sources(src), CHUNK))
            | "Spread" >> beam.Reshuffle()
        )
        loaded = listed | "Load" >> beam.ParDo(_Load(self.model_dir, config))
        examples = loaded | "Examples" >> beam.FlatMap(lambda t: [t[1]] if t[0] == "ok" else [])
        rejected = loaded | "Rejected" >> beam.FlatMap(lambda t: [t[1]] if t[0] == "bad" else [])
        handler = KeyedModelHandler(ArtifactModelHandler(self.model_dir, config))
        handler = handler.with_no_batching()  # batched by Load
        predictions = (
            examples
            | "Infer" >> RunInference(handler)
            | "PerImage" >> beam.FlatMap(_records)
            | "Format" >> beam.ParDo(_Format(self.model_dir, config))
        )
        keyed = (
            predictions | "KeyPredictions" >> beam.Map(_keyed, "predictions", shards),
            rejected | "KeyRejected" >> beam.Map(_keyed, "rejected", shards),
        ) | "AllRecords" >> beam.Flatten()
        grouped = keyed | "ByShard" >> beam.GroupByKey()
        written = grouped | "WriteShards" >> beam.Map(_write_shard, self.out, shards)
        gathered = {
            "written": written,
            "shards": grouped | "ShardKeys" >> beam.Map(lambda item: item[0]),
            "listed": listed | "CountListed" >> beam.Map(len),
        } | "Gather" >> Gather()
        return gathered | "Summarise" >> beam.Map(_summarise, self.out, self.model_dir, config)


# --------------------------------------------------------------------------- options and run


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, BatchPredictConfig, list[str]]:
    """The job's own arguments, its config, and the remaining (Beam) options.

    A plain parser, as in Beam's examples, rather than a ``PipelineOptions`` subclass:
    those share one global namespace, where ``--input`` and ``--max_bytes`` already
    belong to the dedup job's options.
    """
    parser = argparse.ArgumentParser(prog="python -m beam.predict")
    parser.add_argument("--input", required=True, help="images: folder, gs:// prefix, manifest")
    parser.add_argument("--model", required=True, help="a folder written by 'kaedama export'")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    add_config_arguments(parser, BatchPredictConfig, underscore_aliases=True)
    known, rest = parser.parse_known_args(list(argv))
    try:
        config = build_config(BatchPredictConfig, args=known)
    except ConfigError as exc:
        raise BatchPredictError(str(exc)) from exc
    return known, config, rest


def run_job(
    source: str,
    model_dir: str,
    out: str,
    config: BatchPredictConfig,
    pipeline_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Build and run the job; returns ``summary.json``."""
    run_pipeline(
        pipeline_args,
        lambda pipeline: pipeline | "BatchPredict" >> BatchPredict(source, model_dir, out, config),
    )
    return json.loads(storage.read_text(storage.join(out, SUMMARY_NAME)))


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m beam.predict``: parse the arguments and run the job."""
    known, config, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(known.input, known.model, known.output, config, beam_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: run the job; a KaedamaError is printed without a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        summary = run(argv)
    except KaedamaError as exc:
        print(f"beam.predict: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("listed", "predicted", "rejected")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
