"""Empirical privacy audit: membership inference against a trained model.

The attacks are those of tensorflow_privacy's membership-inference tools
(``membership_inference_attack.run_attacks`` with ``AttackInputData``), run
on the model's logits and per-sample losses on training examples (members)
and test examples (non-members), balanced by subsampling the larger side:

* ``THRESHOLD_ATTACK``: the per-sample loss as membership score (low loss:
  member), every threshold;
* ``LOGISTIC_REGRESSION``: a logistic regression on ``[logits, loss]``,
  scored out-of-fold (2-fold stratified cross-validation, as
  tensorflow_privacy does).

Each reports the ROC ``auc`` and the attacker ``advantage = max |TPR - FPR|``
over thresholds. When tensorflow_privacy's ``privacy_tests`` package is not
importable (the tensorflow-privacy 0.9.0 wheel on PyPI does not ship it) the
same two attacks run through scikit-learn here; ``backend`` in the result
says which ran.

What (epsilon, delta)-DP implies (:func:`advantage_bound`,
:func:`auc_bound`) holds for the *expected* TPR / FPR of a fixed attack; the
empirical numbers carry sampling error, so an audit is flagged only when it
exceeds the bound by more than a sampling margin (:func:`sampling_margins`).
An exceedance means a bug in the privacy machinery (or a broken assumption,
e.g. members and non-members not drawn from the same distribution).

The audit reads the private training data: its results are a diagnostic for
the data owner and are **not** covered by the privacy guarantee.
"""

import dataclasses
import math
import os

import numpy as np

from lipdp import runs

ATTACKS = ("threshold", "logistic_regression")


# -- what (epsilon, delta)-DP allows ------------------------------------------
def advantage_bound(epsilon, delta):
    """Largest membership advantage ``max(TPR - FPR)`` an (epsilon, delta)-DP mechanism allows.

    Derivation. Deciding "member" (dataset ``D``, with the target) against
    "non-member" (neighbour ``D'``) from the output is a hypothesis test; DP
    constrains every rejection region ``S`` both ways:
    ``P[M(D) in S] <= e^eps P[M(D') in S] + delta`` and the same with ``D``,
    ``D'`` swapped, applied to the complement of ``S``. With ``x = FPR`` and
    ``y = TPR`` this is the region (Kairouz et al. 2015)::

        y <= e^eps x + delta                  (1)
        y <= 1 - e^-eps (1 - delta - x)       (2)

    ``y - x`` grows along (1) (slope ``e^eps >= 1``) and shrinks along (2)
    (slope ``e^-eps <= 1``), so its maximum is where they meet:
    ``x* = (1 - delta) / (e^eps + 1)`` and ``y* - x* = (e^eps - 1) x* + delta``,
    i.e. ``(e^eps - 1 + 2 delta) / (e^eps + 1)``. By symmetry the same bounds
    ``FPR - TPR``, hence ``max |TPR - FPR|``. Zero at ``eps = delta = 0``,
    increasing in both, tending to 1.
    """
    _check(epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    return min(1.0, (e - 1.0 + 2.0 * delta) / (e + 1.0))


def auc_bound(epsilon, delta):
    """Largest ROC AUC an (epsilon, delta)-DP mechanism allows (the smallest is ``1 - auc_bound``).

    Every attack's ROC curve lies below ``f(x) = min(e^eps x + delta,
    1 - e^-eps (1 - delta - x), 1)`` (region (1)-(2) of
    :func:`advantage_bound`), so its AUC is at most the integral of ``f``
    over ``[0, 1]``. With ``x* = (1 - delta) / (e^eps + 1)`` (where (1) and (2)
    meet) and (2) reaching 1 at ``x = 1 - delta``::

        int_0^x*       (e^eps x + delta) dx          = e^eps x*^2 / 2 + delta x*
        int_x*^(1-delta) (1 - e^-eps (1 - delta - x)) = L - e^-eps L^2 / 2,  L = 1 - delta - x*
        int_(1-delta)^1  1 dx                         = delta

    At ``eps = delta = 0`` this is ``1/8 + 3/8 = 1/2``; it tends to 1 as eps grows.
    """
    _check(epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    x_star = (1.0 - delta) / (e + 1.0)
    rest = 1.0 - delta - x_star
    return min(1.0, e * x_star**2 / 2 + delta * x_star + rest - rest**2 / (2 * e) + delta)


def _check(epsilon, delta):
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta < 1, got ({epsilon}, {delta})")


def sampling_margins(n_members, n_nonmembers, confidence=0.95):
    """How far empirical advantage and AUC may exceed their expectations by chance.

    Treating scores as independent draws: the advantage is a sup over
    thresholds of a difference of two empirical CDFs, each within
    ``sqrt(ln(4 / alpha) / (2 n))`` of its mean with probability
    ``1 - alpha / 2`` (Dvoretzky-Kiefer-Wolfowitz-Massart); the AUC is a
    Mann-Whitney statistic whose value moves by at most ``1/n`` per score, so
    McDiarmid gives ``sqrt(ln(1 / alpha) (1/n + 1/m) / 2)``. Members share
    one trained model, so independence is an approximation: this is a
    screening rule, not a proof.
    """
    alpha = 1.0 - confidence
    dkw = sum(math.sqrt(math.log(4.0 / alpha) / (2.0 * n)) for n in (n_members, n_nonmembers))
    mcdiarmid = math.sqrt(math.log(1.0 / alpha) * (1.0 / n_members + 1.0 / n_nonmembers) / 2.0)
    return {"advantage": dkw, "auc": mcdiarmid, "confidence": confidence}


# -- the attacks ----------------------------------------------------------------
@dataclasses.dataclass
class AttackData:
    """Model outputs on members (training examples) and non-members (test examples)."""

    logits_members: np.ndarray
    loss_members: np.ndarray
    labels_members: np.ndarray
    logits_nonmembers: np.ndarray
    loss_nonmembers: np.ndarray
    labels_nonmembers: np.ndarray

    def balanced(self, seed=0):
        """The same data with the larger side subsampled (without replacement) to the smaller's size."""
        n = min(len(self.loss_members), len(self.loss_nonmembers))
        rng = np.random.default_rng(seed)
        keep_in = np.sort(rng.permutation(len(self.loss_members))[:n])
        keep_out = np.sort(rng.permutation(len(self.loss_nonmembers))[:n])
        return AttackData(
            self.logits_members[keep_in],
            self.loss_members[keep_in],
            self.labels_members[keep_in],
            self.logits_nonmembers[keep_out],
            self.loss_nonmembers[keep_out],
            self.labels_nonmembers[keep_out],
        )


def model_outputs(model, x, y, batch_size=512):
    """``(logits, per-sample loss, integer labels)`` of ``model`` on ``(x, y)`` (one-hot ``y``)."""
    import tensorflow as tf

    logits = model.predict(x, batch_size=batch_size, verbose=0)
    loss = model.loss.call(tf.constant(y, tf.float32), tf.constant(logits, tf.float32)).numpy()
    return logits, loss, np.argmax(y, axis=-1)


def attack_data(model, x_train, y_train, x_test, y_test):
    """:class:`AttackData` for ``model``: training set as members, test set as non-members."""
    return AttackData(*model_outputs(model, x_train, y_train), *model_outputs(model, x_test, y_test))


def _roc_summary(is_member, scores):
    from sklearn import metrics

    fpr, tpr, _ = metrics.roc_curve(is_member, scores)
    return float(metrics.auc(fpr, tpr)), float(np.max(np.abs(tpr - fpr)))


def _sklearn_attacks(data, seed=0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_member = np.r_[np.ones(len(data.loss_members)), np.zeros(len(data.loss_nonmembers))]
    loss = np.r_[data.loss_members, data.loss_nonmembers]
    features = np.c_[np.r_[data.logits_members, data.logits_nonmembers], loss]
    attacker = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(2, shuffle=True, random_state=seed)
    lr_scores = cross_val_predict(attacker, features, is_member, cv=folds, method="predict_proba")[:, 1]
    return {"threshold": _roc_summary(is_member, -loss), "logistic_regression": _roc_summary(is_member, lr_scores)}


def _tf_privacy_attacks(data):
    """tensorflow_privacy's ``run_attacks``; raises ImportError where its ``privacy_tests`` are missing."""
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import data_structures as ds
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import membership_inference_attack as mia

    attack_input = ds.AttackInputData(
        logits_train=data.logits_members,
        logits_test=data.logits_nonmembers,
        loss_train=data.loss_members,
        loss_test=data.loss_nonmembers,
        labels_train=data.labels_members,
        labels_test=data.labels_nonmembers,
    )
    types = {"threshold": ds.AttackType.THRESHOLD_ATTACK, "logistic_regression": ds.AttackType.LOGISTIC_REGRESSION}
    results = mia.run_attacks(attack_input, ds.SlicingSpec(entire_dataset=True), attack_types=list(types.values()))
    by_type = {r.attack_type: r for r in results.single_attack_results}
    return {
        name: (float(by_type[t].get_auc()), float(by_type[t].get_attacker_advantage())) for name, t in types.items()
    }


def run_attacks(data, seed=0, backend="auto"):
    """Runs both attacks on balanced data: ``(backend used, {attack: (auc, advantage)})``."""
    data = data.balanced(seed)
    if backend in ("auto", "tensorflow_privacy"):
        try:
            return "tensorflow_privacy", _tf_privacy_attacks(data)
        except ImportError:
            if backend == "tensorflow_privacy":
                raise
    return "scikit-learn", _sklearn_attacks(data, seed)


# -- the audit ------------------------------------------------------------------
def audit(data, epsilon, delta, seed=0, backend="auto", confidence=0.95):
    """Attack results next to the (epsilon, delta) bounds, as a JSON-ready dict.

    ``exceeds_bound`` is true for an attack whose advantage or AUC goes past
    the bound by more than the sampling margin (a bug, see the module doc);
    ``above_bound_raw`` ignores the margin.
    """
    n = min(len(data.loss_members), len(data.loss_nonmembers))
    used, results = run_attacks(data, seed=seed, backend=backend)
    adv_max, auc_max = advantage_bound(epsilon, delta), auc_bound(epsilon, delta)
    margins = sampling_margins(n, n, confidence)
    attacks = {}
    for name, (auc, advantage) in results.items():
        auc_excess = max(auc - auc_max, (1.0 - auc_max) - auc)
        attacks[name] = {
            "auc": auc,
            "advantage": advantage,
            "above_bound_raw": bool(advantage > adv_max or auc_excess > 0),
            "exceeds_bound": bool(advantage > adv_max + margins["advantage"] or auc_excess > margins["auc"]),
        }
    return {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "advantage_bound": adv_max,
        "auc_bound": auc_max,
        "margins": margins,
        "members": n,
        "nonmembers": n,
        "backend": used,
        "seed": seed,
        "attacks": attacks,
        "exceeds_bound": any(a["exceeds_bound"] for a in attacks.values()),
        "note": "computed on the private training data (members): a diagnostic, not covered by the guarantee",
    }


def audit_run(run, seed=0, backend="auto", write=True, data_dir=None):
    """Audits a ``lipdp train`` run (its folder, or a loaded :class:`lipdp.runs.Run`); writes ``audit.json``."""
    if isinstance(run, (str, os.PathLike)):
        run = runs.load_run(run, data_dir=data_dir)
    dataset = run.dataset()
    data = attack_data(run.model, dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
    result = audit(data, run.privacy["epsilon"], run.privacy["delta"], seed=seed, backend=backend)
    result["data"] = dataset.source
    if write:
        runs.write_json(run.path, runs.AUDIT, result)
    return result


def summary(result):
    """A few human-readable lines for the command line."""
    lines = [
        f"membership inference ({result['backend']}, {result['members']} members vs "
        f"{result['nonmembers']} non-members), (eps={result['epsilon']:.4g}, delta={result['delta']:.3g}) "
        f"allows advantage <= {result['advantage_bound']:.4f}, AUC <= {result['auc_bound']:.4f}"
    ]
    for name, attack in result["attacks"].items():
        flag = "  EXCEEDS THE DP BOUND (bug?)" if attack["exceeds_bound"] else ""
        lines.append(f"  {name:<20} AUC {attack['auc']:.4f}  advantage {attack['advantage']:.4f}{flag}")
    return "\n".join(lines)
