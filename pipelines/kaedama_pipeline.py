"""The kaedama pipeline: dedup -> split -> train -> evaluate -> export -> (gate) -> deploy.

``build_pipeline(image)`` returns the pipeline function (KFP's ``@dsl.pipeline``)
with every component running in ``image``. Deploy runs only when the champion /
challenger gate passes: the new model is significantly better than the model serving
now on the same test set (``champion_metrics``: that model's ``metrics.json``), or,
with no champion, reaches ``min_accuracy``. ``deploy_mode="none"`` stops after export
(what ``kaedama pipeline run-local`` and ``make run`` use: there is no cluster to
deploy to).
"""

# No `from __future__ import annotations`: KFP reads the annotation objects themselves.
from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.stages import DEFAULT_IMAGE, DEFAULT_TRAIN_IMAGE, build

PIPELINE_NAME = "kaedama"


class Outputs(NamedTuple):
    """The pipeline's artifacts, for a caller of a local run (``make run``)."""

    cleaned: Dataset
    split: Dataset
    model: Model
    evaluation: Dataset
    exported: Model


def build_pipeline(image: str = DEFAULT_IMAGE, train_image: str = DEFAULT_TRAIN_IMAGE) -> Callable:
    """The pipeline function: light steps in ``image``, torch steps in ``train_image``."""
    c = build(image, train_image)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Clean, split, train, evaluate, export and deploy an image classifier.",
    )
    def kaedama(
        data_uri: str,
        threshold: int = 4,
        conflict_policy: str = "drop_all",
        dedup_runner: str = "",
        ratios: str = "8,1,1",
        seed: int = 0,
        model_name: str = "tf_efficientnet_lite0",
        epochs: int = 10,
        img_size: int = 0,
        pretrained: bool = True,
        gpus: int = 0,
        nodes: int = 1,
        train_options: list = [],  # noqa: B006 - a KFP default, never mutated
        min_accuracy: float = 0.0,
        champion_metrics: str = "",
        deploy_mode: str = "kserve",
        namespace: str = "kaedama",
        service_name: str = "kaedama",
    ) -> Outputs:
        cleaned = c.dedup(
            data_uri=data_uri,
            threshold=threshold,
            conflict_policy=conflict_policy,
            runner=dedup_runner,
        ).set_display_name("dedup")
        split = c.split(
            dedup_in=cleaned.outputs["dedup_out"], ratios=ratios, seed=seed
        ).set_display_name("split")
        trained = c.train(
            split_in=split.outputs["split_out"],
            model_name=model_name,
            epochs=epochs,
            img_size=img_size,
            pretrained=pretrained,
            gpus=gpus,
            nodes=nodes,
            namespace=namespace,
            image=train_image,
            options=train_options,
        ).set_display_name("train")
        evaluated = c.evaluate(
            model=trained.outputs["model"],
            split_in=split.outputs["split_out"],
            champion_metrics=champion_metrics,
            min_accuracy=min_accuracy,
        ).set_display_name("evaluate")
        exported = c.export(
            model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"]
        ).set_display_name("export")
        with (
            dsl.If(deploy_mode != "none", name="deploy-wanted"),
            dsl.If(evaluated.outputs["promote"] == True, name="champion-challenger"),  # noqa: E712
        ):
            c.deploy(
                exported=exported.outputs["exported"],
                mode=deploy_mode,
                namespace=namespace,
                name=service_name,
            ).set_display_name("deploy")
        return Outputs(
            cleaned=cleaned.outputs["dedup_out"],
            split=split.outputs["split_out"],
            model=trained.outputs["model"],
            evaluation=evaluated.outputs["evaluation"],
            exported=exported.outputs["exported"],
        )

    return kaedama
