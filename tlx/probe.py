"""How well frozen features serve a target, measured without training a network: a closed-form
ridge probe with stratified k-fold cross-validation, and LogME (the log maximum evidence).

Pure numpy (float64) on arrays of features [N, D] and integer labels [N]; nothing of tlx.

- Ridge probe, as big_vision's few-shot evaluator (`fewshot_lsr`): standardise each feature with
  the training part's mean and std (+1e-5), append a constant feature of 100 (an almost
  unregularised bias), regress the one-hot targets rescaled to {-1, 1} with an L2 penalty,
  predict the argmax. One eigendecomposition per fit serves a whole grid of L2 strengths.
- LogME (You et al., ICML 2021): per class, the evidence of Bayesian linear regression of the
  0/1 indicator on the raw features, maximised over the prior precision alpha and the noise
  precision beta by MacKay's fixed point; the score is the mean over classes of evidence / N.
"""

import dataclasses

import numpy as np

BIAS_CONSTANT = 100.0
L2_GRID = tuple(2.0**k for k in range(-4, 15, 3))  # 1/16 .. 4096: 7 strengths


class TooFewExamplesError(ValueError):
    """A class has fewer examples than the cross-validation has folds."""


# -- ridge probe ----------------------------------------------------------------------------------
def _standardise(x_train, *others):
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True) + 1e-5
    out = [(x - mean) / std for x in (x_train, *others)]
    return [np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT) for x in out]


def ridge_design(x_train, y_train, num_classes: int, *others):
    """(standardised features with the bias column, targets in {-1, 1}, *others standardised
    with the training statistics): the exact regression problem the probe solves."""
    x_train = np.asarray(x_train, np.float64)
    xs = _standardise(x_train, *[np.asarray(o, np.float64) for o in others])
    y = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
    return xs[0], y, *xs[1:]


def ridge_weights(x_train, y_train, num_classes: int, l2s=L2_GRID) -> tuple[np.ndarray, tuple]:
    """W [L, D+1, C] = argmin ||X W - Y||^2 + l2 ||W||^2 for each l2, in the design of
    `ridge_design`, from one eigendecomposition (of X^T X, or of X X^T when D > N)."""
    x, y = ridge_design(x_train, y_train, num_classes)
    n, d = x.shape
    if n >= d:  # (X^T X + l2 I)^-1 X^T Y
        eigs, q = np.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ y)
    else:  # X^T (X X^T + l2 I)^-1 Y
        eigs, q = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ y
    eigs = np.maximum(eigs, 0.0)  # round-off can make a zero eigenvalue slightly negative
    w = np.stack([(lhs / (eigs + l2)) @ rhs for l2 in l2s])
    return w, tuple(l2s)


def ridge_accuracy(x_train, y_train, x_test, y_test, num_classes: int, l2s=L2_GRID) -> np.ndarray:
    """Test accuracy [L] of the ridge probe fitted on the training part, one per l2."""
    w, _ = ridge_weights(x_train, y_train, num_classes, l2s)
    _, _, xt = ridge_design(x_train, y_train, num_classes, x_test)
    pred = np.argmax(np.einsum("nd,ldc->lnc", xt, w), -1)
    return (pred == np.asarray(y_test)[None]).mean(-1)


# -- cross-validation -----------------------------------------------------------------------------
def stratified_folds(labels, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index [N] of each example: every class is shuffled (its own stream, seeded by
    (seed, class)) and dealt round-robin, so each fold holds floor or ceil of n_c / folds
    examples of class c. Raises TooFewExamplesError when a class has fewer than `folds`."""
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"folds={folds}: cross-validation needs at least 2")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        c = classes[np.argmin(counts)]
        raise TooFewExamplesError(
            f"class {c} has {counts.min()} training examples, fewer than folds={folds}: "
            f"pass folds={max(2, int(counts.min()))} or fewer (or use more examples per class)"
        )
    fold = np.empty(len(labels), np.int64)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = np.random.default_rng([seed, int(c)]).permutation(idx)
        fold[idx] = np.arange(len(idx)) % folds
    return fold


@dataclasses.dataclass
class ProbeResult:
    accuracy: float  # mean over folds, at the chosen l2
    std: float  # over folds (ddof=1)
    se: float  # std / sqrt(folds)
    l2: float  # the grid strength with the best mean fold accuracy (the larger of equals)
    fold_accuracy: list  # [folds] at the chosen l2
    resolution: float  # one example of the smallest held-out fold: 1 / its size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cross_validate_ridge(
    features, labels, num_classes: int, folds: int = 3, seed: int = 0, l2s=L2_GRID
) -> ProbeResult:
    """k-fold accuracy of the ridge probe; the l2 is chosen on the same folds (one small grid
    for every stage compared, so the slight optimism of the max is shared)."""
    features, labels = np.asarray(features), np.asarray(labels)
    fold = stratified_folds(labels, folds, seed)
    acc = np.stack(
        [
            ridge_accuracy(
                features[fold != f],
                labels[fold != f],
                features[fold == f],
                labels[fold == f],
                num_classes,
                l2s,
            )
            for f in range(folds)
        ]
    )  # [folds, L]
    mean = acc.mean(0)
    best = len(l2s) - 1 - int(np.argmax(mean[::-1]))  # ties: the stronger penalty
    a = acc[:, best]
    std = float(a.std(ddof=1))
    resolution = 1.0 / np.bincount(fold, minlength=folds).min()
    return ProbeResult(
        float(a.mean()), std, float(std / np.sqrt(folds)), float(l2s[best]), a.tolist(), resolution
    )


# -- LogME ----------------------------------------------------------------------------------------
def evidence(f, y, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of y = F w + e, w ~ N(0, I/alpha), e ~ N(0, I/beta), with the
    posterior mean m = beta A^-1 F^T y, A = alpha I + beta F^T F (direct form, for reference)."""
    f, y = np.asarray(f, np.float64), np.asarray(y, np.float64)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    _, logdet = np.linalg.slogdet(a)
    return float(
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - logdet / 2
        - beta / 2 * np.sum((y - f @ m) ** 2)
        - alpha / 2 * np.sum(m**2)
        - n / 2 * np.log(2 * np.pi)
    )


def _max_evidence(u, s2, d, y, max_iter: int, tol: float) -> tuple[float, float, float]:
    """The fixed point of MacKay's updates (gamma = sum beta s^2 / (alpha + beta s^2),
    alpha = gamma / |m|^2, beta = (N - gamma) / |y - F m|^2), in F's SVD: (evidence, alpha,
    beta) at convergence. `u` [N, r], `s2` [r] (squared singular values), d = F's columns."""
    n = len(y)
    uty = u.T @ y  # y's coordinates in F's column space
    resid_out = max(float(y @ y - uty @ uty), 0.0)  # the part of y that F cannot reach
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        shrink = beta * s2 / (alpha + beta * s2)  # per direction, in [0, 1)
        gamma = shrink.sum()
        m2 = np.sum(beta**2 * s2 * uty**2 / (alpha + beta * s2) ** 2)  # |m|^2
        r2 = np.sum(((1 - shrink) * uty) ** 2) + resid_out  # |y - F m|^2
        new_alpha, new_beta = gamma / max(m2, 1e-300), (n - gamma) / max(r2, 1e-300)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * alpha / beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    shrink = beta * s2 / (alpha + beta * s2)
    m2 = np.sum(beta**2 * s2 * uty**2 / (alpha + beta * s2) ** 2)
    r2 = np.sum(((1 - shrink) * uty) ** 2) + resid_out
    logdet = np.sum(np.log(alpha + beta * s2)) + (d - len(s2)) * np.log(alpha)
    ev = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - logdet / 2
        - beta / 2 * r2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(ev), float(alpha), float(beta)


def logme(features, labels, num_classes: int, max_iter: int = 1000, tol: float = 1e-10) -> float:
    """LogME: the mean over classes of max_{alpha, beta} evidence(F, 1[y = c]) / N.

    The public LogME code stops its fixed point after 11 steps or a 1% change of alpha/beta;
    this iterates to `tol`, so it is the maximum the reference optimisation finds. With as many
    independent features as examples (rank F = N: few examples, wide features) no finite beta
    maximises the evidence; LogME is then undefined here: NaN."""
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * 1e-12 if s.size else s > 0
    u, s2 = u[:, keep], s[keep] ** 2
    if len(s2) >= n:  # F F^T invertible: any y is fitted exactly, the evidence grows with beta
        return float("nan")  # without bound towards a limit set by F's smallest directions
    scores = [
        _max_evidence(u, s2, d, (labels == c).astype(np.float64), max_iter, tol)[0] / n
        for c in range(num_classes)
    ]
    return float(np.mean(scores))


@dataclasses.dataclass
class ScoreResult:
    value: float  # on all the examples; NaN where undefined (rank F = N)
    std: float  # over the folds' training parts where defined (ddof=1)
    fold_values: list

    def to_dict(self) -> dict:  # JSON has no NaN: None
        def clean(v):
            return None if isinstance(v, float) and not np.isfinite(v) else v

        d = dataclasses.asdict(self)
        return {k: [clean(x) for x in v] if isinstance(v, list) else clean(v) for k, v in d.items()}


def logme_with_spread(features, labels, num_classes: int, folds: int = 3, seed: int = 0):
    """LogME on all examples, and its spread over the k-fold training parts (the same folds as
    `cross_validate_ridge`): how much it moves with the sample."""
    features, labels = np.asarray(features), np.asarray(labels)
    fold = stratified_folds(labels, folds, seed)
    values = [logme(features[fold != f], labels[fold != f], num_classes) for f in range(folds)]
    finite = [v for v in values if np.isfinite(v)]
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return ScoreResult(logme(features, labels, num_classes), std, values)
