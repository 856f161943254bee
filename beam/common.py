"""What the Beam jobs share: the default runner, running a pipeline, and ``Gather``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from beam.gcs import use_emulator_if_configured

# With no --runner, run the DirectRunner's batch engine directly. Beam 2.77's
# DirectRunner first tries the Prism runner, which downloads a binary from GitHub on
# first use: offline that costs a failed download on every run before it falls back.
DEFAULT_RUNNER = "FnApiRunner"


def import_runner_module(options: PipelineOptions) -> None:
    """Import the module of a runner named by its path, so that its own options parse.

    The DaskRunner (``--runner apache_beam.runners.dask.dask_runner.DaskRunner``)
    defines ``--dask_client_address`` and friends in its module; until it is imported,
    Beam reports them as unparseable (and drops them from ``get_all_options``).
    """
    runner = options.view_as(StandardOptions).runner or ""
    if "." in runner:
        importlib.import_module(runner.rsplit(".", 1)[0])


def run_pipeline(pipeline_args: Sequence[str], build: Callable[[beam.Pipeline], Any]) -> None:
    """Build a pipeline with ``build`` under the standard Beam options and run it to the end.

    Without ``--runner`` (or with ``DirectRunner``: a bounded job gets the same batch
    engine) the DirectRunner's engine runs in this process.
    """
    options = PipelineOptions(list(pipeline_args))
    import_runner_module(options)
    # DoFns live in importable modules; nothing from __main__ needs pickling.
    options.view_as(SetupOptions).save_main_session = False
    standard = options.view_as(StandardOptions)
    if not standard.runner or standard.runner == "DirectRunner":
        standard.runner = DEFAULT_RUNNER
    use_emulator_if_configured()
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    client = getattr(result, "client", None)
    if client is not None:
        # The DaskRunner leaves its dask.distributed client connected (and, without
        # --dask_client_address, its own LocalCluster running): release them.
        client.close()


def _tagged(element: Any, name: str) -> tuple[None, tuple[str, Any]]:
    return (None, (name, element))


def _by_name(grouped: tuple[None, Iterable[tuple[str, Any]]], names: Sequence[str]) -> dict:
    out: dict[str, list] = {name: [] for name in names}
    for name, element in grouped[1]:
        if name:  # the anchor element has no name
            out[name].append(element)
    return out


class Gather(beam.PTransform):
    """``{name: PCollection}`` -> one element ``{name: [every element of it]}``.

    Every input is tagged and grouped under one key: one shuffle brings all of them to
    one worker. (A ``ToList`` combiner per input costs several stages and a side input
    each, and the runner measures every side input's size object by object.) The
    element exists, with empty lists, even when every input is empty. List order is
    unspecified; the consumers sort.
    """

    def expand(self, pcolls):
        names = sorted(pcolls)
        tagged = [pcolls[name] | f"Tag_{name}" >> beam.Map(_tagged, name) for name in names]
        pipeline = pcolls[names[0]].pipeline
        anchor = beam.pvalue.PBegin(pipeline) | "Anchor" >> beam.Create([(None, ("", None))])
        return (
            (*tagged, anchor)
            | "Flatten" >> beam.Flatten()
            | "GroupAll" >> beam.GroupByKey()
            | "ByName" >> beam.Map(_by_name, names)
        )
