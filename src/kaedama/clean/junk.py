"""The wanted/unwanted classifier: learn from images a person removed, flag more like them.

A two-class logistic regression (scikit-learn) on embeddings: unwanted examples (a
folder of them, or the URIs / sha256s of rows a person removed) against the
dataset's kept images. It is saved as a small ``.npz`` (weights, no pickle) that
names its embedding model, so applying it with another model is refused.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from kaedama import storage
from kaedama.clean.labels import normalize
from kaedama.errors import KaedamaError

FORMAT_VERSION = 1


class JunkModelError(KaedamaError):
    """A junk model cannot be trained, read or applied."""


@dataclass(frozen=True)
class JunkModel:
    """``P(unwanted | embedding)`` as a standardised linear model.

    Attributes:
        model_key: the embedding model key the weights were fitted on.
        mean, scale: the standardisation of the unit-length embeddings.
        coef, intercept: the logistic regression.
        threshold: the probability from which an image counts as unwanted by default.
        info: how it was trained (counts, cross-validated scores), for people.
    """

    model_key: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """``(N,)`` probabilities that each image is unwanted."""
        z = (normalize(embeddings) - self.mean) / self.scale
        logits = z @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array([FORMAT_VERSION], dtype=np.int64),
            model_key=np.array([self.model_key], dtype=np.str_),
            mean=self.mean,
            scale=self.scale,
            coef=self.coef,
            intercept=np.array([self.intercept], dtype=np.float64),
            threshold=np.array([self.threshold], dtype=np.float64),
            info=np.array([json.dumps(self.info, sort_keys=True)], dtype=np.str_),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, uri: str = "junk model") -> JunkModel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if int(z["version"][0]) != FORMAT_VERSION:
                    raise JunkModelError(
                        f"{uri}: junk model format {int(z['version'][0])} "
                        "is not supported; train it again"
                    )
                return cls(
                    model_key=str(z["model_key"][0]),
                    mean=np.asarray(z["mean"], np.float64),
                    scale=np.asarray(z["scale"], np.float64),
                    coef=np.asarray(z["coef"], np.float64),
                    intercept=float(z["intercept"][0]),
                    threshold=float(z["threshold"][0]),
                    info=json.loads(str(z["info"][0])),
                )
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise JunkModelError(
                f"{uri}: not a kaedama junk model ({exc}); train one with "
                "kaedama clean --unwanted SRC --junk-model FILE"
            ) from exc

    def save(self, uri: str) -> None:
        storage.write_bytes(uri, self.to_bytes())

    @classmethod
    def load(cls, uri: str) -> JunkModel:
        if not storage.exists(uri):
            raise JunkModelError(
                f"junk model {uri} not found; train one with kaedama clean --unwanted SRC "
                "--junk-model FILE"
            )
        return cls.from_bytes(storage.read_bytes(uri), uri=uri)


def train_junk_model(
    unwanted: np.ndarray,
    wanted: np.ndarray,
    model_key: str,
    *,
    c: float = 0.1,
    seed: int = 0,
    calibrate: bool = True,
) -> JunkModel:
    """Fit unwanted (1) against wanted (0) embeddings, classes weighted to balance.

    The wanted side is the dataset's kept images, which may still hold unwanted ones
    (that is why the model is trained): strong regularisation (``c`` on standardised
    features) keeps the model from memorising them as wanted.

    ``info`` records the counts and, when both sides have 3+ examples, the
    cross-validated average precision, so a person can judge the model before use.
    ``threshold`` is the probability that maximises F1 on those held-out folds: the
    probabilities of a model fitted on a few examples against a whole dataset run low
    (unseen unwanted images score well above wanted ones, yet below 0.5), so a fixed
    0.5 would find nothing. Without cross-validation (or ``calibrate=False``) it
    stays 0.5.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, precision_recall_curve
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(unwanted) < 1 or len(wanted) < 1:
        raise JunkModelError(
            f"the junk model needs unwanted and wanted examples; got {len(unwanted)} "
            f"unwanted and {len(wanted)} wanted"
        )
    x = normalize(np.concatenate([unwanted, wanted]))
    y = np.concatenate([np.ones(len(unwanted)), np.zeros(len(wanted))]).astype(np.int64)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(x), y)
    info: dict = {"unwanted": int(len(unwanted)), "wanted": int(len(wanted))}
    threshold = 0.5
    folds = min(5, len(unwanted), len(wanted))
    if folds >= 3 and calibrate:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        # The scaler is refitted inside each fold: no held-out statistics leak in.
        probe = make_pipeline(StandardScaler(), clf)
        held_out = cross_val_predict(probe, x, y, cv=cv, method="predict_proba")[:, 1]
        info["cv_average_precision"] = round(float(average_precision_score(y, held_out)), 4)
        precision, recall, cuts = precision_recall_curve(y, held_out)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = int(np.argmax(f1))
        threshold = float(cuts[best])
        info["cv_f1"] = round(float(f1[best]), 4)
    info["threshold"] = round(threshold, 6)
    return JunkModel(
        model_key=model_key,
        mean=scaler.mean_.astype(np.float64),
        scale=np.where(scaler.scale_ > 0, scaler.scale_, 1.0).astype(np.float64),
        coef=clf.coef_[0].astype(np.float64),
        intercept=float(clf.intercept_[0]),
        threshold=threshold,
        info=info,
    )


def cross_fitted_scores(
    unwanted: np.ndarray,
    wanted: np.ndarray,
    model_key: str,
    *,
    folds: int = 5,
    c: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Scores of the ``wanted`` rows, each from a model that did not see it as wanted.

    The wanted side is the dataset itself, unwanted images included: scored by the
    model trained on them as wanted, those images score low. Scoring each fold of the
    dataset with a model fitted on the other folds (cross-fitting) finds them.
    """
    from sklearn.model_selection import KFold

    scores = np.zeros(len(wanted), dtype=np.float64)
    if len(wanted) < 2:
        return train_junk_model(unwanted, wanted, model_key, c=c, calibrate=False).scores(wanted)
    split = KFold(n_splits=min(folds, len(wanted)), shuffle=True, random_state=seed)
    for train, test in split.split(wanted):
        model = train_junk_model(
            unwanted, wanted[train], model_key, c=c, seed=seed, calibrate=False
        )
        scores[test] = model.scores(wanted[test])
    return scores
