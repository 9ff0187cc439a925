"""Radiomics feature selection and the five classical classifiers (paper, Appendix 8, Table 2, Fig. 5).

Every model is one scikit-learn Pipeline, so selection is refitted inside each training split and
never sees the test patients:

    SimpleImputer(median) -> RadiomicsSelector -> StandardScaler -> classifier

``RadiomicsSelector`` (fitted on training data only): standardise; L1-penalised multinomial
logistic regression (saga) with C tuned by GridSearchCV (stratified 5-fold, log-loss); keep the
features with a non-zero coefficient for any class; then, in order of decreasing |coefficient|,
drop every feature whose |Pearson r| with an already kept one exceeds ``corr_threshold`` (0.9).
When the LASSO keeps nothing (pure noise), the ``min_features`` features with the highest ANOVA F
on the training data are used instead, so every classifier gets at least one input.

Designs: ``split75`` (the paper's stratified 75:25 train/test split, metrics on the 25 %) and
``cv4`` (stratified 4-fold cross-validation; out-of-fold probabilities for every patient).
Metrics come from :mod:`analysis.metrics` (one-vs-rest AUC per class, macro AUC, 95 % bootstrap
CI, accuracy, sensitivity/specificity, confusion matrix).

Radiomic score (for the Cox model): from the ``score_model`` (default naive Bayes, the paper's
"radiomics model" of Fig. 6) out-of-fold probabilities of the cv4 design,
``radiomic_score = prob_0 + prob_1``: the predicted probability of short survival (class 0 or 1,
died before 36 months). Higher = worse prognosis.

Patients: only those with a defined ``risk_class`` (analysis.cohort rule) and a feature row are
used. Patients with undefined risk class, clinical patients without features, and feature rows
without a clinical row are left out, logged, and listed in ``tables/excluded.csv`` with the
reason (a feature row without clinical data usually means the two files come from different
cohorts, so the count is also in the summary).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from analysis import metrics
from analysis.datalists import assign_folds
from analysis.io import save_figure, write_csv, write_json

log = logging.getLogger(__name__)

NUM_CLASSES = 4
PROB_COLUMNS = [f"prob_{k}" for k in range(NUM_CLASSES)]
#: Table 2 order
MODEL_NAMES: tuple[str, ...] = ("naive_bayes", "random_forest", "svm", "decision_tree", "xgboost")
DISPLAY_NAMES = {
    "naive_bayes": "Naive Bayes",
    "random_forest": "Random forest",
    "svm": "SVM",
    "decision_tree": "Decision tree",
    "xgboost": "XGBoost",
    "dl": "Deep model (given predictions)",
}
DESIGNS = ("cv4", "split75")
DEFAULT_SCORE_MODEL = "naive_bayes"
SCORE_DEFINITION = "prob_0 + prob_1 (P(short survival)) of the score model's cv4 out-of-fold prediction"


# ------------------------------------------------------------------------------- selection
class RadiomicsSelector(TransformerMixin, BaseEstimator):
    """LASSO (L1 multinomial logistic, GridSearchCV over C) then Pearson-correlation pruning.

    Fitted attributes: ``support_`` (indices of the kept input columns, importance order),
    ``lasso_support_`` (indices with a non-zero coefficient), ``importance_`` (max |coef| over
    classes, per input column), ``best_C_``, ``dropped_`` (list of (dropped, kept, r)),
    ``fallback_`` (True when the ANOVA fallback was used).
    """

    def __init__(self, Cs=(0.03, 0.1, 0.3, 1.0, 3.0), corr_threshold: float = 0.9, cv: int = 5,
                 min_features: int = 3, max_iter: int = 1000, random_state: int = 0):
        self.Cs = Cs
        self.corr_threshold = corr_threshold
        self.cv = cv
        self.min_features = min_features
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y):
        X = np.asarray(X, dtype=float)
        y = np.asarray(y).astype(int)
        if len(np.unique(y)) < 2:
            raise ValueError(f"feature selection needs at least 2 classes in the training data; got {np.unique(y)}")
        self.n_features_in_ = X.shape[1]
        Z = StandardScaler().fit_transform(X)
        lasso = LogisticRegression(l1_ratio=1.0, solver="saga", max_iter=self.max_iter, tol=1e-3,
                                   random_state=self.random_state)
        n_splits = min(self.cv, int(np.bincount(y)[np.unique(y)].min()))
        with warnings.catch_warnings():
            # saga on small, wide data stops at max_iter for the weakest penalties; the chosen C
            # is judged by cross-validated log-loss anyway
            warnings.simplefilter("ignore", ConvergenceWarning)
            if n_splits >= 2:
                grid = GridSearchCV(lasso, {"C": list(self.Cs)}, scoring="neg_log_loss",
                                    cv=StratifiedKFold(n_splits, shuffle=True, random_state=self.random_state))
                grid.fit(Z, y)
                best = grid.best_estimator_
                self.best_C_ = float(grid.best_params_["C"])
            else:
                log.warning("a class has a single training sample: LASSO C not tuned (C=1.0)")
                best = clone(lasso).set_params(C=1.0).fit(Z, y)
                self.best_C_ = 1.0
        self.importance_ = np.abs(best.coef_).max(axis=0)
        self.lasso_support_ = np.flatnonzero(self.importance_ > 0)
        self.fallback_ = len(self.lasso_support_) == 0
        if self.fallback_:
            with np.errstate(divide="ignore", invalid="ignore"):
                f, _ = f_classif(X, y)
            f = np.nan_to_num(f, nan=0.0)
            candidates = list(np.argsort(-f, kind="stable")[: self.min_features])
        else:
            candidates = sorted(self.lasso_support_, key=lambda j: -self.importance_[j])
        self.support_, self.dropped_ = self._prune(Z, candidates)
        return self

    def _prune(self, Z: np.ndarray, candidates: list[int]) -> tuple[np.ndarray, list]:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.corrcoef(Z[:, candidates], rowvar=False) if len(candidates) > 1 else np.ones((1, 1))
        r = np.nan_to_num(np.atleast_2d(r), nan=0.0)  # constant columns correlate with nothing
        kept: list[int] = []
        dropped: list[tuple[int, int, float]] = []
        for i, j in enumerate(candidates):
            hit = next((candidates.index(k) for k in kept if abs(r[i, candidates.index(k)]) > self.corr_threshold), None)
            if hit is None:
                kept.append(j)
            else:
                dropped.append((int(j), int(candidates[hit]), float(r[i, hit])))
        return np.array(kept, dtype=int), dropped

    def transform(self, X):
        check_is_fitted(self, "support_")
        X = np.asarray(X, dtype=float)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features; the selector was fitted on {self.n_features_in_}")
        return X[:, self.support_]


class CalibratedSVC(ClassifierMixin, BaseEstimator):
    """RBF SVC with Platt-scaled probabilities: what ``SVC(probability=True)`` did.

    scikit-learn 1.9 deprecates ``probability=True`` in favour of
    ``CalibratedClassifierCV(SVC(), ensemble=False)``; this wraps that and picks the number of
    calibration folds from the training data (at most 5, at least 2), since small training splits
    can hold fewer than 5 patients of a class. With a single patient in some class, calibration
    is impossible and a softmax of the one-vs-rest decision values is used instead.
    """

    def __init__(self, C: float = 1.0, kernel: str = "rbf", random_state: int = 0):
        self.C = C
        self.kernel = kernel
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        y = np.asarray(y)
        self.classes_, counts = np.unique(y, return_counts=True)
        svc = SVC(C=self.C, kernel=self.kernel, random_state=self.random_state, decision_function_shape="ovr")
        k = int(min(5, counts.min()))
        if k >= 2:
            cv = StratifiedKFold(k, shuffle=True, random_state=self.random_state)
            self.model_ = CalibratedClassifierCV(svc, method="sigmoid", cv=cv, ensemble=False).fit(X, y)
        else:
            self.model_ = svc.fit(X, y)
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        if hasattr(self.model_, "predict_proba"):
            return self.model_.predict_proba(X)
        d = np.atleast_2d(self.model_.decision_function(X))
        if len(self.classes_) == 2:
            d = np.column_stack([-d.ravel(), d.ravel()])
        e = np.exp(d - d.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def make_classifier(name: str, seed: int = 0):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB
    from sklearn.tree import DecisionTreeClassifier
    from xgboost import XGBClassifier

    factories = {
        "decision_tree": lambda: DecisionTreeClassifier(random_state=seed),
        "svm": lambda: CalibratedSVC(random_state=seed),
        "random_forest": lambda: RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1),
        "xgboost": lambda: XGBClassifier(n_estimators=100, max_depth=3, learning_rate=0.1, subsample=1.0,
                                         random_state=seed, n_jobs=1, eval_metric="mlogloss",
                                         tree_method="hist"),
        "naive_bayes": GaussianNB,
    }
    if name not in factories:
        raise ValueError(f"model {name!r} is not known; expected one of {', '.join(MODEL_NAMES)}")
    return factories[name]()


def make_model(name: str, seed: int = 0, corr_threshold: float = 0.9) -> Pipeline:
    """The full pipeline of one classifier (unfitted)."""
    return Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("select", RadiomicsSelector(corr_threshold=corr_threshold, random_state=seed)),
        ("scale", StandardScaler()),
        ("clf", make_classifier(name, seed)),
    ])


# ---------------------------------------------------------------------------------- inputs
def _read(obj, what: str) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    path = Path(obj)
    if not path.is_file():
        raise FileNotFoundError(f"--{what} {path}: no such file")
    if what == "clinical":
        from analysis.clinical_table import RULE_COLUMNS, TableInputError, read_clinical_table

        frame = read_clinical_table(path, required=("patient_id",))
        if "risk_class" not in frame:
            missing = [c for c in RULE_COLUMNS if c not in frame]
            raise TableInputError(f"{path} row 1 (header): no risk_class column and column(s) "
                                  f"{', '.join(map(repr, missing))} of the rule not found; expected risk_class "
                                  f"or {', '.join(RULE_COLUMNS)} to derive it (found: {', '.join(frame.columns)})")
        return frame
    return pd.read_csv(path)


def load_dataset(features, clinical) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """(X indexed by patient_id, y risk_class, excluded[patient_id, reason]).

    Feature columns that are non-numeric, all missing or constant over every patient are dropped
    (label-free, so no leakage); the count is logged.
    """
    feats = _read(features, "features")
    clin = _read(clinical, "clinical")
    for frame, what in ((feats, "features"), (clin, "clinical")):
        if "patient_id" not in frame:
            raise ValueError(f"--{what}: no patient_id column (columns: {list(frame.columns)[:5]}...)")
    if "risk_class" not in clin:
        raise ValueError("--clinical: no risk_class column and it could not be derived "
                         "(needs os_months, death, imaging_high_risk)")
    feats["patient_id"] = feats["patient_id"].astype(str).str.strip()
    clin["patient_id"] = clin["patient_id"].astype(str).str.strip()
    dup = feats["patient_id"][feats["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"--features: patient_id repeated: {dup[:10]}")
    feats = feats.set_index("patient_id")
    risk = pd.to_numeric(clin.set_index("patient_id")["risk_class"], errors="coerce")
    excluded = []
    for pid in feats.index.difference(risk.index):
        excluded.append({"patient_id": pid, "reason": "in features but not in clinical.csv"})
    for pid in risk.index.difference(feats.index):
        excluded.append({"patient_id": pid, "reason": "no radiomic features (see features_errors.csv)"})
    common = [p for p in feats.index if p in risk.index]
    undefined = [p for p in common if pd.isna(risk[p])]
    excluded += [{"patient_id": p, "reason": "risk_class undefined (censored before 36 months)"} for p in undefined]
    keep = [p for p in common if not pd.isna(risk[p])]
    y = risk[keep].astype(int).rename("risk_class")
    bad = sorted(set(y) - set(range(NUM_CLASSES)))
    if bad:
        raise ValueError(f"--clinical: risk_class values {bad}; expected 0..3")
    X = feats.loc[keep].apply(pd.to_numeric, errors="coerce")
    usable = X.columns[X.notna().any() & (X.nunique(dropna=True) > 1)]
    if len(usable) < X.shape[1]:
        log.info("classify: %d of %d feature columns dropped (non-numeric, empty or constant)",
                 X.shape[1] - len(usable), X.shape[1])
    X = X[usable]
    if X.shape[1] == 0:
        raise ValueError("--features: no usable numeric feature column")
    exc = pd.DataFrame(excluded, columns=["patient_id", "reason"])
    for row in exc.itertuples():
        log.warning("classify: %s left out: %s", row.patient_id, row.reason)
    return X, y, exc


# ----------------------------------------------------------------------------- evaluation
def _stratify_ok(y: pd.Series, n: int) -> bool:
    counts = y.value_counts()
    if counts.min() < n:
        log.warning("class %s has %d patient(s), fewer than %d: stratification is approximate",
                    counts.idxmin(), counts.min(), n)
    return counts.min() >= 2


def design_splits(y: pd.Series, design: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positional index pairs of a design."""
    idx = np.arange(len(y))
    if design == "cv4":
        _stratify_ok(y, 4)
        # the same patient-level stratified folds as the prognosis datalist (one implementation,
        # which also copes with cohorts where no class can fill every fold)
        folds = assign_folds(pd.Series(np.asarray(y)), folds=4, seed=seed).to_numpy()
        return [(idx[folds != k], idx[folds == k]) for k in range(4)]
    if design == "split75":
        strat = y if _stratify_ok(y, 2) else None
        n_test = int(np.ceil(0.25 * len(y)))
        if strat is not None and n_test < y.nunique():
            log.warning("split75: a test set of %d patient(s) cannot hold all %d classes; split not stratified",
                        n_test, y.nunique())
            strat = None
        tr, te = train_test_split(idx, test_size=0.25, stratify=strat, random_state=seed)
        return [(np.sort(tr), np.sort(te))]
    raise ValueError(f"--design {design!r}; expected one of cv4, split75, both")


def fit_models(X_train, y_train, models=MODEL_NAMES, seed: int = 0, corr_threshold: float = 0.9
               ) -> dict[str, Pipeline]:
    """Fitted pipelines of several models on one training set, equal to ``make_model(m).fit``.

    Imputation and selection depend only on the training data, not on the classifier, so they
    are fitted once and shared by the five pipelines (selection is the slow step).
    """
    template = make_model(models[0], seed=seed, corr_threshold=corr_threshold)
    prefix = Pipeline(template.steps[:2]).fit(X_train, y_train)
    Z = prefix.transform(X_train)
    fitted = {}
    for m in models:
        tail = Pipeline([("scale", StandardScaler()), ("clf", make_classifier(m, seed))]).fit(Z, y_train)
        fitted[m] = Pipeline([*prefix.steps, *tail.steps])
    return fitted


def predict_four_classes(pipe: Pipeline, classes: np.ndarray, X_test) -> np.ndarray:
    """4-column probabilities; classes missing from the training split get probability 0."""
    p = pipe.predict_proba(X_test)
    out = np.zeros((len(X_test), NUM_CLASSES))
    out[:, classes[pipe.classes_]] = p
    return out


def prediction_frame(probs: np.ndarray, patient_ids, fold: int, labels) -> pd.DataFrame:
    """One fold's rows of the prediction-file contract: patient_id, fold, prob_0..3, pred_class, label."""
    frame = pd.DataFrame(probs, columns=PROB_COLUMNS)
    frame.insert(0, "fold", fold)
    frame.insert(0, "patient_id", list(patient_ids))
    frame["pred_class"] = probs.argmax(axis=1)
    frame["label"] = labels
    return frame


def predict_design(X: pd.DataFrame, y: pd.Series, design: str, models=MODEL_NAMES, seed: int = 0,
                   corr_threshold: float = 0.9) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per model, predictions (predictions.csv columns + label) of the design's test patients,
    and the features selected in each training split."""
    splits = design_splits(y, design, seed)
    preds = {m: [] for m in models}
    selected = []
    for fold, (tr, te) in enumerate(splits):
        y_tr = y.iloc[tr].to_numpy()
        classes = np.unique(y_tr)
        if len(classes) < 2:
            raise ValueError(f"{design} split {fold}: training patients hold only class {classes.tolist()}")
        # labels re-encoded 0..m-1 for the fit: XGBoost requires contiguous labels
        fitted = fit_models(X.iloc[tr], np.searchsorted(classes, y_tr), list(models), seed, corr_threshold)
        for m, pipe in fitted.items():
            preds[m].append(prediction_frame(predict_four_classes(pipe, classes, X.iloc[te]), X.index[te], fold,
                                             y.iloc[te].to_numpy()))
        sel = pipe.named_steps["select"]
        for rank, j in enumerate(sel.support_):
            selected.append({"design": design, "fold": fold, "rank": rank, "feature": X.columns[j],
                             "lasso_importance": float(sel.importance_[j]), "fallback": bool(sel.fallback_)})
    out = {m: pd.concat(v, ignore_index=True).sort_values("patient_id", kind="stable").reset_index(drop=True)
           for m, v in preds.items()}
    return out, pd.DataFrame(selected)


def radiomic_score(oof: pd.DataFrame) -> pd.DataFrame:
    """``patient_id, radiomic_score, pred_class, prob_0..prob_3, fold, label`` (see module doc)."""
    out = oof[["patient_id"]].copy()
    out["radiomic_score"] = oof["prob_0"] + oof["prob_1"]
    out["pred_class"] = oof["pred_class"]
    for c in [*PROB_COLUMNS, "fold", "label"]:
        out[c] = oof[c]
    return out


def read_dl_predictions(path) -> pd.DataFrame:
    """A predictions.csv (contracts) of the deep model: one row per patient, probabilities sum to 1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dl-predictions {path}: no such file")
    frame = pd.read_csv(path, dtype={"patient_id": str})
    missing = [c for c in ["patient_id", *PROB_COLUMNS] if c not in frame]
    if missing:
        raise ValueError(f"--dl-predictions {path}: missing columns {missing}; expected "
                         "patient_id, fold, prob_0..prob_3, pred_class")
    frame["patient_id"] = frame["patient_id"].str.strip()
    dup = frame["patient_id"][frame["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"--dl-predictions {path}: patient_id repeated {dup[:5]}; expected out-of-fold "
                         "predictions, one row per patient")
    probs = frame[PROB_COLUMNS].apply(pd.to_numeric, errors="coerce")
    bad = frame.loc[probs.isna().any(axis=1) | ((probs.sum(axis=1) - 1).abs() > 1e-3), "patient_id"].tolist()
    if bad:
        raise ValueError(f"--dl-predictions {path}: rows of {bad[:5]} have missing probabilities or ones "
                         "that do not sum to 1")
    frame[PROB_COLUMNS] = probs
    return frame


def compare_with_dl(preds: dict[str, pd.DataFrame], dl: pd.DataFrame, n_boot: int, seed: int
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired bootstrap of each model's AUCs against the deep model on the patients both predicted.

    Returns (comparison table, the deep model's predictions restricted to those patients + label).
    """
    rows = []
    dl_common = None
    for m, pr in preds.items():
        merged = pr.merge(dl[["patient_id", *PROB_COLUMNS]], on="patient_id", suffixes=("", "_dl"))
        lost = sorted(set(pr["patient_id"]) - set(merged["patient_id"]))
        if lost and dl_common is None:
            log.warning("classify: %d patient(s) have no deep-model prediction and are left out of the "
                        "comparison: %s", len(lost), lost[:10])
        if len(merged) == 0:
            raise ValueError("--dl-predictions: no patient in common with the radiomics predictions")
        y = merged["label"].to_numpy()
        a = merged[PROB_COLUMNS].to_numpy()
        b = merged[[f"{c}_dl" for c in PROB_COLUMNS]].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.AbsentClassWarning)
            table = metrics.paired_bootstrap_test(y, a, b, n_boot=n_boot, seed=seed)
        table = table.rename(columns={"auc_a": "auc_model", "auc_b": "auc_dl"})
        table.insert(0, "model", m)
        table["n"] = len(merged)
        rows.append(table)
        if dl_common is None:
            dl_common = merged[["patient_id", "label"]].assign(
                **{c: merged[f"{c}_dl"] for c in PROB_COLUMNS}, fold=-1)
            dl_common["pred_class"] = dl_common[PROB_COLUMNS].to_numpy().argmax(axis=1)
    return pd.concat(rows, ignore_index=True), dl_common


# --------------------------------------------------------------------------------- figures
# Each figure comes with a pure function giving the table it shows (saved beside the PNG by
# analysis.io.save_figure); the plot functions draw and return the Axes / Figure, never a file.
def roc_points(preds: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """model, class, fpr, tpr, auc: every model's one-vs-rest ROC curve per class (a class absent
    from a model's labels has no curve)."""
    from sklearn.metrics import roc_curve

    rows = []
    for name, pr in preds.items():
        y = pr["label"].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.AbsentClassWarning)
            aucs = metrics.per_class_auc(y, pr[PROB_COLUMNS].to_numpy())
        for k in range(NUM_CLASSES):
            if not np.isfinite(aucs[k]):
                continue
            fpr, tpr, _ = roc_curve((y == k).astype(int), pr[f"prob_{k}"])
            rows += [{"model": name, "class": k, "fpr": a, "tpr": b, "auc": aucs[k]} for a, b in zip(fpr, tpr)]
    return pd.DataFrame(rows, columns=["model", "class", "fpr", "tpr", "auc"])


def plot_roc(preds: dict[str, pd.DataFrame], title: str = "", fig=None):
    """One panel per model (Fig. 5): the four one-vs-rest ROC curves with their AUCs.

    Args:
        preds: model name -> predictions (label, prob_0..prob_3); the curves are :func:`roc_points`'.
        title: the figure's title.
        fig: Figure to draw the panels into; None makes one, up to three panels a row.

    Returns:
        the Figure.
    """
    import matplotlib.pyplot as plt

    names = list(preds)
    points = roc_points(preds)
    ncol = min(3, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    own = fig is None
    if own:
        fig = plt.figure(figsize=(4.2 * ncol, 4 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        curves = points[points["model"] == name]
        aucs = []
        for k, curve in curves.groupby("class", sort=True):
            auc = float(curve["auc"].iloc[0])
            aucs.append(auc)
            ax.plot(curve["fpr"], curve["tpr"], label=f"class {k} (AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        macro = float(np.mean(aucs)) if aucs else np.nan
        ax.set_title(f"{DISPLAY_NAMES.get(name, name)}: macro AUC {macro:.2f}", fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    if own:
        fig.tight_layout()
    return fig


def pca_components(X: pd.DataFrame, y: pd.Series) -> tuple[pd.DataFrame, list[float]]:
    """(patient_id, risk_class, pc1, pc2, pc3 per patient; explained variance ratio of each PC) of
    the standardised features (median-imputed); PCs beyond the data's rank are 0."""
    from sklearn.decomposition import PCA

    Z = StandardScaler().fit_transform(SimpleImputer(strategy="median").fit_transform(X))
    k = min(3, Z.shape[1], Z.shape[0])
    pcs = np.zeros((len(Z), 3))
    pca = PCA(n_components=k, random_state=0).fit(Z)
    pcs[:, :k] = pca.transform(Z)
    data = pd.DataFrame({"patient_id": X.index, "risk_class": y.to_numpy(),
                         "pc1": pcs[:, 0], "pc2": pcs[:, 1], "pc3": pcs[:, 2]})
    return data, [float(v) for v in pca.explained_variance_ratio_] + [0.0] * (3 - k)


def plot_pca(X: pd.DataFrame, y: pd.Series, ax=None):
    """3-D scatter of the first three principal components of the selected features, by class.

    Args:
        X: the selected features, one row per patient (index patient_id).
        y: each patient's risk class; the points are :func:`pca_components`'.
        ax: a 3-D Axes (projection="3d") to draw on; None draws on a new figure.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    data, var = pca_components(X, y)
    if ax is None:
        ax = plt.figure(figsize=(6, 5)).add_subplot(projection="3d")
    for c in sorted(data["risk_class"].unique()):
        d = data[data["risk_class"] == c]
        ax.scatter(d["pc1"], d["pc2"], d["pc3"], label=f"class {c}", s=18)
    ax.set_xlabel(f"PC1 ({var[0]:.0%})")
    ax.set_ylabel(f"PC2 ({var[1]:.0%})")
    ax.set_zlabel(f"PC3 ({var[2]:.0%})")
    ax.set_title(f"PCA of the {X.shape[1]} selected radiomic features")
    ax.legend(fontsize=8)
    return ax


def plot_confusion(conf: pd.DataFrame, title: str = "", fig=None):
    """One confusion matrix per model (Fig. 5): rows true class, columns predicted class.

    Args:
        conf: model, true_class, pred_0..pred_3 (the table :func:`evaluate_models` gives per design).
        title: the figure's title.
        fig: Figure to draw the panels into; None makes one, one panel per model in a row.

    Returns:
        the Figure.
    """
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(conf["model"]))
    own = fig is None
    if own:
        fig = plt.figure(figsize=(3.2 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)
    pred_cols = [f"pred_{k}" for k in range(NUM_CLASSES)]
    for ax, name in zip(axes.ravel(), names):
        m = conf[conf["model"] == name].sort_values("true_class")[pred_cols].to_numpy()
        ax.imshow(m, cmap="Blues")
        for i in range(NUM_CLASSES):
            for j in range(NUM_CLASSES):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(NUM_CLASSES))
        ax.set_yticks(range(NUM_CLASSES))
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(DISPLAY_NAMES.get(name, name), fontsize=10)
    fig.suptitle(title)
    if own:
        fig.tight_layout()
    return fig


MAX_HEATMAP_FEATURES = 40


def feature_correlation(X: pd.DataFrame, max_features: int = MAX_HEATMAP_FEATURES) -> pd.DataFrame:
    """Pearson correlation of the first ``max_features`` columns of ``X`` (a constant column's r
    is 0), as a table with a leading ``feature`` column."""
    return X.iloc[:, :max_features].corr(method="pearson").fillna(0.0).reset_index(names="feature")


def plot_correlation(X: pd.DataFrame, max_features: int = MAX_HEATMAP_FEATURES, ax=None):
    """Pearson correlation heatmap of the LASSO-selected features (Appendix 8, panel C).

    Args:
        X: the features, columns in importance order; the matrix drawn is :func:`feature_correlation`'s.
        max_features: only the first this many are drawn (a readable figure; the paper shows 8); the
            title says how many were left out.
        ax: Axes to draw on; None draws on a new figure sized to the number of features.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    corr = feature_correlation(X, max_features).set_index("feature")
    n = len(corr)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(max(5, 0.45 * n + 3), max(4, 0.45 * n + 2)))
    im = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(n), corr.columns, rotation=90, fontsize=6)
    ax.set_yticks(range(n), corr.index, fontsize=6)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{corr.iat[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.figure.colorbar(im, ax=ax, label="Pearson r")
    left_out = max(0, X.shape[1] - max_features)
    more = f" (top {max_features} of {X.shape[1]} by |coefficient|)" if left_out else ""
    ax.set_title(f"Correlation of LASSO-selected features{more}")
    if own:
        ax.figure.tight_layout()
    return ax


# ---------------------------------------------------------------------------------- driver
def _model_summary(res: dict) -> dict:
    return {k: res[k] for k in ("macro_auc", "macro_auc_ci", "auc_per_class", "auc_ci", "accuracy", "n")}


def _evaluate(name: str, preds: pd.DataFrame, n_boot: int, seed: int, design: str) -> tuple[dict, pd.DataFrame]:
    """(summary entry, long metrics table) of one model's predictions."""
    y, p = preds["label"].to_numpy(), preds[PROB_COLUMNS].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.AbsentClassWarning)
        res = metrics.evaluate(y, p, n_boot=n_boot, seed=seed)
        table = metrics.metrics_table(y, p, result=res)
    table.insert(0, "model", name)
    table.insert(0, "design", design)
    return _model_summary(res), table


def evaluate_models(features, clinical, design: str = "both", models=MODEL_NAMES, seed: int = 0,
                    n_boot: int = metrics.DEFAULT_N_BOOT, corr_threshold: float = 0.9,
                    score_model: str = DEFAULT_SCORE_MODEL, dl_predictions=None) -> dict:
    """Everything ``classify`` writes, as DataFrames and dicts (no file output).

    Keys: X, y, excluded, predictions {design: {model: df}}, selected_per_split, metrics
    (long table), confusion, summary, radiomic_score, selection (all-data fit for the figures),
    dl_comparison / dl_predictions when ``dl_predictions`` is given.
    """
    models = list(models)
    for m in models:
        make_classifier(m)  # fails early with the list of known names
    if score_model not in models:
        raise ValueError(f"--score-model {score_model!r} is not among the models run: {models}")
    designs = list(DESIGNS) if design == "both" else [design]
    for d in designs:
        if d not in DESIGNS:
            raise ValueError(f"--design {design!r}; expected one of cv4, split75, both")
    X, y, excluded = load_dataset(features, clinical)
    if len(y) < 8:
        raise ValueError(f"only {len(y)} labelled patients with features; classification needs at least 8")
    log.info("classify: %d patients, %d features, classes %s", len(y), X.shape[1], y.value_counts().sort_index().to_dict())
    for k in sorted(set(range(NUM_CLASSES)) - set(y)):
        log.warning("classify: class %d has no patient: its AUC is reported as null, left out of the macro AUC", k)
    dl = read_dl_predictions(dl_predictions) if dl_predictions is not None else None

    out: dict = {"X": X, "y": y, "excluded": excluded, "predictions": {}, "dl_comparison": {}, "dl_predictions": {}}
    metric_tables, conf_rows, selected = [], [], []
    summaries = {}
    run_designs = designs if "cv4" in designs else [*designs, "cv4"]  # cv4 always feeds the score
    for d in run_designs:
        run_models = models if d in designs else [score_model]
        preds, sel = predict_design(X, y, d, run_models, seed=seed, corr_threshold=corr_threshold)
        out["predictions"][d] = preds
        if d not in designs:
            continue
        selected.append(sel)
        summaries[d] = {}
        for m, pr in preds.items():
            summaries[d][m], table = _evaluate(m, pr, n_boot, seed, d)
            metric_tables.append(table)
            cm = metrics.confusion(pr["label"], pr["pred_class"])
            cm.insert(0, "model", m)
            cm.insert(0, "design", d)
            conf_rows.append(cm)
        if dl is not None:
            comp, dl_pred = compare_with_dl(preds, dl, n_boot, seed)
            comp.insert(0, "design", d)
            out["dl_comparison"][d] = comp
            out["dl_predictions"][d] = dl_pred
            summaries[d]["dl"], table = _evaluate("dl", dl_pred, n_boot, seed, d)
            metric_tables.append(table)
    out["metrics"] = pd.concat(metric_tables, ignore_index=True)
    out["confusion"] = pd.concat(conf_rows, ignore_index=True)
    out["selected_per_split"] = pd.concat(selected, ignore_index=True)
    out["radiomic_score"] = radiomic_score(out["predictions"]["cv4"][score_model])

    # selection on every labelled patient: for the selected-feature list and the figures only
    # (never used to score a model)
    imputed = SimpleImputer(strategy="median", keep_empty_features=True).fit_transform(X)
    sel = RadiomicsSelector(corr_threshold=corr_threshold, random_state=seed).fit(imputed, y.to_numpy())
    rows = []
    dropped = {d: (k, r) for d, k, r in sel.dropped_}
    base = sel.lasso_support_ if not sel.fallback_ else [*sel.support_, *dropped]
    base = sorted(base, key=lambda j: -sel.importance_[j])
    for j in base:
        k, r = dropped.get(j, (None, np.nan))
        rows.append({"feature": X.columns[j], "lasso_importance": float(sel.importance_[j]),
                     "kept": j not in dropped, "correlated_with": None if k is None else X.columns[k],
                     "pearson_r": r})
    out["selection"] = {"table": pd.DataFrame(rows, columns=["feature", "lasso_importance", "kept",
                                                             "correlated_with", "pearson_r"]),
                        "lasso_features": [X.columns[j] for j in base],
                        "selected": [X.columns[j] for j in sel.support_], "best_C": sel.best_C_,
                        "fallback": bool(sel.fallback_)}
    primary = designs[0]
    summary = {"design": primary, "models": {m: s for m, s in summaries[primary].items() if m != "dl"},
               "score_model": score_model, "score_definition": SCORE_DEFINITION,
               "n_patients": len(y), "n_features_in": int(X.shape[1]),
               "class_counts": {str(k): int(v) for k, v in y.value_counts().sort_index().items()},
               "n_excluded": len(excluded), "selected_features": out["selection"]["selected"],
               "corr_threshold": corr_threshold, "n_boot": n_boot, "seed": seed}
    for d in designs[1:]:
        summary.setdefault("other_designs", {})[d] = {m: s for m, s in summaries[d].items() if m != "dl"}
    if dl is not None:
        summary["dl"] = {d: summaries[d]["dl"] for d in designs}
        comp = out["dl_comparison"][primary]
        macro = comp[comp["auc"] == "macro"].set_index("model")
        summary["dl_comparison"] = {m: {"macro_auc_difference": float(macro.loc[m, "difference"]),
                                        "p_value": float(macro.loc[m, "p_value"]), "n": int(macro.loc[m, "n"])}
                                    for m in models}
    out["summary"] = summary
    return out


def classify(features, clinical, out, dl_predictions=None, design: str = "both", models=MODEL_NAMES,
             seed: int = 0, n_boot: int = metrics.DEFAULT_N_BOOT, corr_threshold: float = 0.9,
             score_model: str = DEFAULT_SCORE_MODEL) -> dict:
    """Run :func:`evaluate_models` and write tables, figures, predictions and the radiomic score.

    Layout under ``out``: summary.json, radiomic_score.csv, predictions/<design>_<model>.csv,
    tables/{metrics,confusion,selected_features,selected_features_per_split,excluded,
    dl_comparison}.csv, figures/{roc_<design>,confusion_<design>,pca_3d,correlation_heatmap}.png
    (+ tables/<stem>.csv, the data behind each figure).
    """
    res = evaluate_models(features, clinical, design=design, models=models, seed=seed, n_boot=n_boot,
                          corr_threshold=corr_threshold, score_model=score_model, dl_predictions=dl_predictions)
    out = Path(out)
    designs = list(DESIGNS) if design == "both" else [design]
    for d in designs:
        for m, pr in res["predictions"][d].items():
            write_csv(out / "predictions" / f"{d}_{m}.csv", pr)
        panels = dict(res["predictions"][d])
        if d in res["dl_predictions"]:
            panels = {"dl": res["dl_predictions"][d], **panels}
        what = "4-fold cross-validation, out-of-fold" if d == "cv4" else "stratified 75:25 split, test set"
        save_figure(out / "figures" / f"roc_{d}.png", plot_roc(panels, f"One-vs-rest ROC per class ({what})"),
                    data=roc_points(panels))
        conf = res["confusion"][res["confusion"]["design"] == d].drop(columns="design")
        save_figure(out / "figures" / f"confusion_{d}.png", plot_confusion(conf, f"Confusion matrices ({what})"),
                    data=conf)
    write_csv(out / "tables" / "metrics.csv", res["metrics"])
    write_csv(out / "tables" / "confusion.csv", res["confusion"])
    write_csv(out / "tables" / "selected_features.csv", res["selection"]["table"])
    write_csv(out / "tables" / "selected_features_per_split.csv", res["selected_per_split"])
    write_csv(out / "tables" / "excluded.csv", res["excluded"])
    if res["dl_comparison"]:
        write_csv(out / "tables" / "dl_comparison.csv", pd.concat(res["dl_comparison"].values(), ignore_index=True))
    X, y = res["X"], res["y"]
    selected = X[res["selection"]["selected"]]
    save_figure(out / "figures" / "pca_3d.png", plot_pca(selected, y).figure, data=pca_components(selected, y)[0])
    lasso = X[res["selection"]["lasso_features"]]
    save_figure(out / "figures" / "correlation_heatmap.png", plot_correlation(lasso).figure,
                data=feature_correlation(lasso))
    write_csv(out / "radiomic_score.csv", res["radiomic_score"])
    write_json(out / "summary.json", res["summary"])
    return res


def classify_cli(features: str, clinical: str, out: str, dl_predictions: str | None = None,
                 design: str = "both", models: str = ",".join(MODEL_NAMES), seed: int = 0,
                 n_boot: int = metrics.DEFAULT_N_BOOT, corr_threshold: float = 0.9,
                 score_model: str = DEFAULT_SCORE_MODEL) -> str:
    """Feature selection + five classifiers on radiomic features, with ROC/AUC and 95 % bootstrap CI.

    Selection (LASSO, then correlation pruning) is refitted inside every training split. Patients need
    a defined risk_class and a feature row; the others are listed in tables/excluded.csv. Writes
    summary.json, radiomic_score.csv (the score model's cv4 out-of-fold prob_0 + prob_1),
    predictions/, tables/ and figures/ into OUT.

    Args:
        features: feature table CSV from ``radiomics`` (patient_id + one column per feature).
        clinical: clinical.csv with patient_id and risk_class (or os_months, death, imaging_high_risk
            to derive it).
        out: output folder.
        dl_predictions: the deep model's out-of-fold predictions.csv (patient_id, prob_0..prob_3);
            every model's AUCs are compared with it by paired bootstrap on the patients both predicted.
        design: cv4 (stratified 4-fold cross-validation), split75 (stratified 75/25 train/test split)
            or both; summary.json reports the first one (cv4 for both).
        models: comma-separated classifiers among naive_bayes, random_forest, svm, decision_tree, xgboost.
        seed: seed of the splits, the classifiers and the bootstrap.
        n_boot: bootstrap resamples for the AUC confidence intervals and the paired comparison.
        corr_threshold: of two selected features with |Pearson r| above this, the less important is dropped.
        score_model: the model (one of --models) whose cv4 out-of-fold probabilities give the radiomic score.
    """
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    try:
        res = classify(features, clinical, out, dl_predictions=dl_predictions, design=design, models=names,
                       seed=seed, n_boot=n_boot, corr_threshold=corr_threshold, score_model=score_model)
    except (ValueError, FileNotFoundError) as exc:
        from analysis.clinical_table import usage_exit

        raise usage_exit(f"classify: {exc}") from None
    s = res["summary"]
    best = max(s["models"], key=lambda m: s["models"][m]["macro_auc"] or 0)
    return (f"{s['n_patients']} patients ({s['n_excluded']} excluded), {len(s['selected_features'])} selected "
            f"features; {s['design']} best macro AUC {s['models'][best]['macro_auc']:.3f} ({best}); "
            f"outputs in {out}")
