"""Head warm-up: train the Eq. 6 head on cached decoder features before end-to-end training.

At initialisation the Eq. 6 scores (ReLU, then the mean over every voxel of instance-normalised
decoder maps) hardly depend on the input, so end-to-end training starts at the chance loss and
needs thousands of updates to leave it (docs/README.md, "Quality on the synthetic cohort").
The head alone is a 1x1x1 convolution: with the backbone frozen, its input (the last decoder
stage, ``ProgSwinUNETR.features``) can be computed once per patient, and a thousand head updates
then take seconds on a CPU. End-to-end training starts from that head.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events

from scripts.flags import as_bool
from scripts.io import save_figure
from scripts.metrics import AbsentClassWarning, accuracy, macro_auc
from scripts.net import backbone_and_head, unwrap

log = logging.getLogger(__name__)


@torch.no_grad()
def cache_features(network: torch.nn.Module, dataset, device, dtype=torch.float16,
                   stride: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(features (N, F, D, H, W) on the CPU in ``dtype``, the region-pooling head's input
    on the same grid (N, C, D, H, W; None for the other heads), labels (N,)) of every item of
    ``dataset`` (deterministic preprocessing), the network in eval mode.

    ``stride`` > 1 keeps every stride-th voxel along each axis: the head's mean over voxels is then
    estimated from a regular subsample, for ``stride ** 3`` times less memory (fp16 at stride 1:
    N x feature_size x voxels x 2 bytes, 6 MB per patient at 64^3 x 12, 200 MB at 128^3 x 48).
    """
    net, stride = unwrap(network), int(stride)
    was_training = net.training
    net.eval()
    feats, inputs, labels = [], [], []
    plain = lambda t: torch.as_tensor(t[..., ::stride, ::stride, ::stride]).as_subclass(torch.Tensor).to("cpu", dtype)
    try:
        for i in range(len(dataset)):
            item = dataset[i]
            x = torch.as_tensor(item["image"]).unsqueeze(0).to(device)
            feats.append(plain(net.features(x)))
            r = net.pooling_input(x)
            if r is not None:
                inputs.append(plain(r))
            labels.append(int(torch.as_tensor(item["label"]).reshape(-1)[0]))
    finally:
        net.train(was_training)
    return torch.cat(feats), (torch.cat(inputs) if inputs else None), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def pooled_vectors(network: torch.nn.Module, features: torch.Tensor, inputs: torch.Tensor, device,
                   batch_size: int = 8) -> torch.Tensor:
    """(N, width): the region-pooling head's pooled vector of each cached item, before its scaler."""
    net = unwrap(network)
    return torch.cat([net.pooled_vector(features[i:i + batch_size].to(device, torch.float32),
                                        inputs[i:i + batch_size].to(device, torch.float32)).cpu()
                      for i in range(0, len(features), batch_size)])


def balanced_weights(labels) -> torch.Tensor:
    """Per-item sampling weights 1 / (count of its class): each class drawn equally often."""
    labels = torch.as_tensor(labels).long()
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


@torch.no_grad()
def head_probabilities(network: torch.nn.Module, features: torch.Tensor, device, batch_size: int = 8,
                       inputs: torch.Tensor | None = None) -> np.ndarray:
    net = unwrap(network)
    out = [torch.softmax(_head(net, features, inputs, slice(i, i + batch_size), device), 1).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out).numpy()


def _validation_row(net, val_features, val_labels, val_inputs, device) -> dict:
    """Validation macro AUC and accuracy of the head on cached features ({} without them)."""
    if val_features is None or not len(val_features):
        return {}
    pv = head_probabilities(net, val_features, device, inputs=val_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)
        auc = macro_auc(val_labels.numpy(), pv)
    return {"val_macro_auc": auc, "val_accuracy": accuracy(val_labels.numpy(), pv)}


def _head(net, features, inputs, index, device) -> torch.Tensor:
    r = None if inputs is None else inputs[index].to(device, torch.float32)
    return net.head(features[index].to(device, torch.float32), r)


def train_head(network: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, steps: int,
               learning_rate: float = 3e-3, batch_size: int = 8, balanced: bool = True,
               weight_decay: float = 1e-4, device="cpu", seed: int = 0, log_interval: int = 100,
               val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
               inputs: torch.Tensor | None = None, val_inputs: torch.Tensor | None = None,
               l2: float = 0.0) -> pd.DataFrame:
    """``steps`` AdamW updates of the head only (``swin.out``, and ``classifier`` in the
    hidden-layer variant), on cached features, the
    learning rate decaying from ``learning_rate`` to 0 on a cosine.

    Batches are drawn with replacement, class-balanced when ``balanced``. Returns the learning
    curve: every ``log_interval`` steps the mean training loss since the last row, the accuracy
    on all cached training items and, when validation features are given, their macro AUC and
    accuracy. ``inputs`` / ``val_inputs``: the cached network input (region-pooling head).
    ``l2``: a penalty ``l2 * sum(weight ** 2)`` on the weights of the head's last linear map
    (``ProgSwinUNETR.final_weight``) added to the loss: a logistic regression's ridge penalty. AdamW's decoupled
    weight decay is scaled by the learning rate and barely regularises; on a few hundred patients
    and tens of pooled inputs the head then fits the random features' noise.
    """
    net = unwrap(network)
    optimizer = torch.optim.AdamW(backbone_and_head(net)[1], lr=float(learning_rate), weight_decay=float(weight_decay))
    # cosine decay to 0: the head's problem is small and nearly convex, a high rate early and a
    # small one late converges in far fewer steps than one fixed rate
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(steps), 1))
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int(seed))
    weights = balanced_weights(labels) if balanced else torch.ones(len(labels), dtype=torch.double)
    rows, running = [], []
    for step in range(1, int(steps) + 1):
        idx = torch.multinomial(weights, min(int(batch_size), len(labels)), replacement=True, generator=gen)
        logits = _head(net, features, inputs, idx, device)
        loss = loss_fn(logits, labels[idx].to(device))
        if l2:
            loss = loss + float(l2) * net.final_weight().pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(float(loss.detach()))
        if step % int(log_interval) == 0 or step == int(steps):
            y = labels.numpy()
            row = {"step": step, "train_loss": float(np.mean(running)),
                   "train_accuracy": accuracy(y, head_probabilities(net, features, device, inputs=inputs))}
            row.update(_validation_row(net, val_features, val_labels, val_inputs, device))
            rows.append(row)
            running = []
    return pd.DataFrame(rows)


#: how the warm-up fits the head: AdamW steps on every head layer, or an exact logistic regression
#: of the region-pooling classifier
SOLVERS = ("adamw", "logistic")


def fit_head_logistic(network: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                      inputs: torch.Tensor, l2: float = 0.0, balanced: bool = True, max_iter: int = 1000,
                      device="cpu", val_features: torch.Tensor | None = None,
                      val_labels: torch.Tensor | None = None, val_inputs: torch.Tensor | None = None,
                      vectors: torch.Tensor | None = None) -> pd.DataFrame:
    """Region pooling: fit the linear ``classifier`` on the cached patients' standardised pooled
    vectors as a multinomial logistic regression (scikit-learn, L-BFGS, to convergence), with
    ``swin.out`` and the scaler as they are; its coefficients become the classifier's weights.

    The same objective as :func:`train_head` with the hidden map frozen, ``mean CE + l2 *
    sum(W ** 2)`` (class-balanced weights when ``balanced``; scikit-learn's ``C = 1 / (2 l2 N)``),
    solved exactly instead of by a few hundred minibatch steps: on 144 synthetic patients the
    steps stop 0.02-0.05 of out-of-fold AUC short of the optimum (docs/README.md, "The CPU recipe
    of release 0.8.0"). Returns a one-row learning curve (``step`` = L-BFGS iterations).
    ``vectors``: the patients' pooled vectors when the caller has them already (the scaler's fit).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    net = unwrap(network)
    if not getattr(net, "region_pooling", False):
        raise ValueError(f"warmup_solver 'logistic' fits the region-pooling classifier; this network has pooling "
                         f"'{net.pooling}' (use warmup_solver 'adamw')")
    y = labels.numpy()
    if vectors is None:
        vectors = pooled_vectors(net, features, inputs, device)
    z = ((vectors - net.pooled_mean.cpu()) / net.pooled_scale.cpu()).double()
    c = 1.0 / (2.0 * float(l2) * len(y)) if l2 else np.inf
    model = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=int(max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(z.numpy(), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        # the fit so far is still a usable start for the end-to-end epochs: say so, do not stop
        log.warning("head warm-up: the logistic regression did not converge in %d L-BFGS iterations "
                    "(warmup_steps); raise warmup_steps or warmup_l2", max_iter)
    present = [int(k) for k in model.classes_]
    weight = torch.zeros_like(net.classifier.weight, dtype=torch.float64)
    bias = torch.full_like(net.classifier.bias, -30.0, dtype=torch.float64)  # a class never seen: ~0 probability
    coef = torch.as_tensor(model.coef_)
    if len(present) == 2:  # scikit-learn's binary form: one row of log-odds for the second class
        coef = torch.stack([-coef[0] / 2, coef[0] / 2])
        intercept = torch.as_tensor([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    else:
        intercept = torch.as_tensor(model.intercept_)
    weight[present], bias[present] = coef, intercept
    with torch.no_grad():
        net.classifier.weight.copy_(weight.to(net.classifier.weight.dtype))
        net.classifier.bias.copy_(bias.to(net.classifier.bias.dtype))
    p = head_probabilities(net, features, device, inputs=inputs)
    w = balanced_weights(labels).numpy() if balanced else np.ones(len(y))
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))
    row = {"step": int(np.max(model.n_iter_)), "train_loss": float(np.sum(w * nll) / np.sum(w)),
           "train_accuracy": accuracy(y, p), "converged": converged}
    row.update(_validation_row(net, val_features, val_labels, val_inputs, device))
    return pd.DataFrame([row])


class HeadWarmup:
    """Ignite handler: before the first epoch of a fresh run, train the head on cached features.

    Args:
        network: the ProgSwinUNETR being trained (or DDP around it).
        dataset: the training patients with deterministic preprocessing (no augmentation).
        steps: head updates; 0 (the paper's recipe) turns the warm-up off.
        learning_rate, batch_size, balanced, weight_decay: of the head's own AdamW.
        val_dataset: optional, the validation patients (deterministic): their macro AUC is
            logged along the warm-up's learning curve.
        output_dir: where ``warmup_curve.csv`` / ``.png`` go (None: not written).
        device: where features are computed and the head trained.
        feature_stride: cache every n-th voxel per axis (see :func:`cache_features`); 1 = all.
            The region statistics are read from the cached grid too: at stride 4 a tumour of a
            few hundred voxels keeps a handful, and its intensity spread (the heterogeneity of a
            high-risk lesion) is lost (docs/README.md, "Recipe measurements").
        standardize: region pooling only: fit the pooled vector's scaler on the training
            patients (``ProgSwinUNETR.set_standardization``) before the head steps.
        l2: the classifier's ridge penalty during the warm-up (see :func:`train_head`).
        solver: ``"adamw"`` (``steps`` AdamW updates of every head layer, :func:`train_head`) or
            ``"logistic"`` (region pooling: the classifier fitted exactly as a logistic regression
            on the pooled vectors, ``steps`` its L-BFGS iteration cap, ``swin.out`` left to the
            end-to-end epochs; :func:`fit_head_logistic`).
        learned_scale: region pooling: the learned parts' scale after standardisation (see
            ``ProgSwinUNETR.set_standardization``); 1 = every part alike.

    A resumed run (epoch > 0 after the checkpoint is loaded) skips it: attach it after the
    resume loader and the pretrained loader.
    """

    def __init__(self, network, dataset, steps: int = 0, learning_rate: float = 3e-3, batch_size: int = 8,
                 balanced=True, weight_decay: float = 1e-4, val_dataset=None, output_dir: str | None = None,
                 device="cpu", seed: int = 0, log_interval: int = 100, feature_stride: int = 1,
                 standardize=True, l2: float = 0.0, solver: str = "adamw", learned_scale: float = 1.0) -> None:
        self.network, self.dataset, self.val_dataset = network, dataset, val_dataset
        self.steps, self.learning_rate, self.batch_size = int(steps), float(learning_rate), int(batch_size)
        self.balanced, self.weight_decay = as_bool(balanced, "balanced_sampling"), float(weight_decay)
        self.output_dir, self.device, self.seed, self.log_interval = output_dir, device, int(seed), int(log_interval)
        self.feature_stride = int(feature_stride)
        self.standardize = as_bool(standardize, "warmup_standardize")
        self.l2 = float(l2)
        if self.l2 < 0:
            raise ValueError(f"warmup_l2 must be >= 0; got {l2}")
        if self.steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {steps}")
        self.solver = str(solver).strip().lower()
        if self.solver not in SOLVERS:
            raise ValueError(f"warmup_solver: expected one of {list(SOLVERS)}; got {solver!r}")
        self.learned_scale = float(learned_scale)
        if not 0 < self.learned_scale <= 1:
            raise ValueError(f"warmup_learned_scale must be in (0, 1]; got {learned_scale}")
        self.curve: pd.DataFrame | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.steps == 0:
            return
        if engine.state.epoch > 0:
            log.info("resumed at epoch %d: head warm-up skipped", engine.state.epoch)
            return
        t0 = time.perf_counter()
        features, inputs, labels = cache_features(self.network, self.dataset, self.device, stride=self.feature_stride)
        val = (cache_features(self.network, self.val_dataset, self.device, stride=self.feature_stride)
               if self.val_dataset is not None else (None, None, None))
        t1 = time.perf_counter()
        net = unwrap(self.network)
        vectors = None
        if self.standardize and getattr(net, "region_pooling", False):
            # swin.out is not trained before the logistic fit, so the scaler's vectors are its input too
            vectors = pooled_vectors(net, features, inputs, self.device, self.batch_size)
            net.set_standardization(vectors, learned_scale=self.learned_scale)
        if self.solver == "logistic":
            self.curve = fit_head_logistic(self.network, features, labels, inputs, self.l2, self.balanced, self.steps,
                                           self.device, val_features=val[0], val_labels=val[2], val_inputs=val[1],
                                           vectors=vectors)
        else:
            self.curve = train_head(self.network, features, labels, self.steps, self.learning_rate, self.batch_size,
                                    self.balanced, self.weight_decay, self.device, self.seed, self.log_interval,
                                    val_features=val[0], val_labels=val[2], inputs=inputs, val_inputs=val[1],
                                    l2=self.l2)
        last = self.curve.iloc[-1].to_dict()
        fit = (f"{self.steps} head steps" if self.solver == "adamw"
               else f"logistic regression ({int(last['step'])} L-BFGS iterations)")
        log.info("head warm-up: %d patients' features cached in %.1f s, %s in %.1f s; %s",
                 len(labels), t1 - t0, fit, time.perf_counter() - t1,
                 ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("step", "converged")))
        if self.output_dir:
            self._save(os.path.join(self.output_dir, "warmup_curve.png"))

    def _save(self, path: str) -> None:
        import matplotlib.pyplot as plt

        curve = self.curve
        fig, ax = plt.subplots(figsize=(6, 4))
        # markers: the logistic solver's curve is a single point
        ax.plot(curve["step"], curve["train_loss"], "o-", label="training loss")
        ax.set(xlabel="head step" if self.solver == "adamw" else "L-BFGS iterations", ylabel="cross-entropy",
               title=f"head warm-up on cached features ({self.solver})")
        ax2 = ax.twinx()
        ax2.plot(curve["step"], curve["train_accuracy"], "C1s--", label="training accuracy")
        if "val_macro_auc" in curve:
            ax2.plot(curve["step"], curve["val_macro_auc"], "C2^-", label="validation macro AUC")
        ax2.set(ylim=(0, 1.02), ylabel="accuracy / AUC")
        fig.legend(loc="lower left", fontsize=8)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_figure(path, fig, curve)
