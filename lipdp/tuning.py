"""Private hyper-parameter search: a random number of DP trials, the best one released with one guarantee.

Choosing hyper-parameters on the private data leaks it; running ``K`` trials
and publishing the best would cost ``K`` runs by composition. Papernot &
Steinke ("Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022)
show that when ``K`` is itself *random and secret* -- truncated negative
binomial (geometric, logarithmic) or Poisson -- and only the best trial is
published, the whole search costs a small multiple of one trial's Renyi DP
(their Theorems 2 and 6). dp-accounting implements the bound as
``RepeatAndSelectDpEvent(trial, mean, shape)`` in its RDP accountant; this
module only describes the search to it.

:func:`tune` (``lipdp tune CONFIG --space SPACE.yaml --private``) runs:

1. **Carve.** The training split is cut into a *fit* part and a *validation*
   part by a hash of each example (inputs and label): an example's part
   depends on that example alone, so adding or removing one example changes
   one part by one example (add-or-remove-one adjacency on each part). The
   real test split is never loaded into a decision.
2. **Trials.** ``K`` is drawn from :class:`TrialCount` with secret randomness
   (OS entropy, or a ``seed`` that must then stay secret). Each trial draws a
   configuration from the :class:`SearchSpace` (random search, independent
   of the data) and is one DP training run (:func:`lipdp.training.run`) of it
   on the fit part, every release the run makes included (its
   ``privacy.json`` ledger: statistics, steps).
3. **Private score.** Each trial releases the number of correct predictions
   of its model on the validation part plus Gaussian noise of standard
   deviation ``score_noise``: sensitivity 1 (an example added to the
   validation part changes the count by at most 1; one added to the fit part
   changes the model, which the training event covers). The trial's event is
   the run's event composed with ``GaussianDpEvent(score_noise)``.
4. **Selection.** The trial with the highest noisy score is released: its
   model, its configuration and its noisy validation accuracy. The search's
   (epsilon, delta) is the RDP accountant's epsilon of
   ``RepeatAndSelectDpEvent(trial event, mean, shape)``, at the config's
   delta.

Written to the tune folder: ``model.keras`` (the selected model),
``config.yaml`` (its configuration), ``tune.json`` (the search: its
guarantee, the trial event and search event as dp-accounting ledgers, the
distribution of ``K``, the space, the selected values and noisy score) and
``statement.txt`` (the guarantee in words). **Not released, and not covered:**
the number of trials ``K``, which trial was selected, the other trials'
models and scores, the exact validation accuracies, the training curves; the
trials run in a temporary folder removed when the search ends. The search's
running time grows with ``K``: keep it private too (the guarantee assumes an
observer sees the released files only). With Poisson ``K`` the search may run
no trial: nothing but the record is written then (that outcome is covered).

Assumptions and limits:

* Every trial must have the *same* privacy event. The space may not vary
  what sets it -- ``dataset``, ``privacy``, ``sampling``,
  ``training.epochs``, ``model.feature_statistics`` (:data:`PRIVACY_KEYS`) --
  and each run's recorded policy is checked against the event declared
  before the first trial (a mismatch aborts the search, releasing nothing).
  Searching over noise, epochs or batch size would need the worst trial's
  RDP curve, which dp-accounting's events do not express.
* Poisson sampling only, without ``sampling.seed`` (the trials must be
  independent runs, each drawing its batches afresh): the hash carve keeps add-or-remove-one adjacency on
  each part, but turns a replacement into a removal from one part and an
  addition to the other, which the shuffle sampler's replace-one accounting
  does not cover.
* The sizes of the two parts are treated as public, as the training set size
  is by every lipdp run (the sampling rate ``B / N`` is computed from it).
* A random ``K`` is accounted with the RDP accountant whatever the config's
  accountant (only it implements the theorem). ``shape="fixed"`` runs exactly
  ``mean`` trials and composes them (``SelfComposedDpEvent``, the config's
  accountant); a single fixed trial releases no score (there is nothing to
  select) and costs exactly one run.
* Nothing about the trials may be published: a published ``K``, seed or
  trial count turns the search into a fixed-``K`` search, which this bound
  does not cover.
"""

import dataclasses
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
import warnings

import numpy as np
import yaml

from lipdp import accounting, data, runs, training
from lipdp import config as config_lib
from lipdp.errors import ConfigError, NotPrivateError, PrivacyParameterError, RunExistsError
from lipdp.ledger import ledger_to_json
from lipdp.policy import PrivacyPolicy
from lipdp.search_cost import search_epsilon, trial_event

#: Config keys a search may not vary: they set the trials' privacy event (data, sampling, noise, steps, releases).
PRIVACY_KEYS = ("dataset", "privacy", "sampling", "training.epochs", "model.feature_statistics")
#: Files of the tune folder (the released artefacts).
RECORD, STATEMENT = "tune.json", "statement.txt"


# -- the search space ----------------------------------------------------------------------------------------
_RANGES = ("uniform", "log_uniform", "integers")


def _check_dimension(key, spec):
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"search space {key}: an empty list of values")
        return
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _RANGES):
        raise ConfigError(
            f"search space {key}: expected a list of values or one of "
            + ", ".join(f"{{{kind}: [low, high]}}" for kind in _RANGES)
            + f", got {spec!r}"
        )
    ((kind, bounds),) = spec.items()
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, numbers.Real) for b in bounds)):
        raise ConfigError(f"search space {key}.{kind}: expected [low, high], got {bounds!r}")
    low, high = bounds
    if not low < high or (kind == "log_uniform" and low <= 0) or (kind == "integers" and low != int(low)):
        raise ConfigError(f"search space {key}.{kind}: [{low}, {high}] is not a valid range for {kind}")


def _touches_privacy(key):
    """Whether setting ``key`` can change a :data:`PRIVACY_KEYS` entry (the key itself, below or above one)."""
    return any(f"{key}.".startswith(f"{p}.") or f"{p}.".startswith(f"{key}.") for p in PRIVACY_KEYS)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Config keys and what a trial draws for each: a list (one value, uniformly) or a range.

    In YAML: ``optimizer.learning_rate: {log_uniform: [0.001, 0.1]}``,
    ``model.layers.4.clip_value: [0.001, 0.01]``, ``training.seed: {integers:
    [0, 1000]}`` (inclusive), ``model.input_norm: {uniform: [0.5, 2]}``. Keys
    are ``--set`` paths; list items by index.
    """

    dimensions: dict

    def __post_init__(self):
        if not isinstance(self.dimensions, dict):
            raise ConfigError(f"search space: expected a mapping of config keys, got {self.dimensions!r}")
        for key, spec in self.dimensions.items():
            if _touches_privacy(str(key)):
                raise ConfigError(
                    f"search space {key}: sets the trials' privacy event (one of {', '.join(PRIVACY_KEYS)}), which "
                    "must be the same in every trial; fix it in the config"
                )
            _check_dimension(key, spec)

    @classmethod
    def load(cls, path):
        with open(path) as handle:
            return cls(yaml.safe_load(handle) or {})

    def draw(self, rng):
        """One configuration: ``{key: value}``, drawn independently of the data."""
        values = {}
        for key, spec in self.dimensions.items():
            if isinstance(spec, list):
                values[key] = spec[int(rng.integers(len(spec)))]
                continue
            ((kind, (low, high)),) = spec.items()
            if kind == "integers":
                values[key] = int(rng.integers(int(low), int(high) + 1))
            elif kind == "log_uniform":
                values[key] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
            else:
                values[key] = float(rng.uniform(low, high))
        return values

    def first(self):
        """A configuration from the space's first value / low end of each key (to validate keys before data)."""
        return {k: s[0] if isinstance(s, list) else next(iter(s.values()))[0] for k, s in self.dimensions.items()}


def configure(cfg, values):
    """``cfg`` with ``values`` (``{--set key: value}``) set, validated as a config."""
    tree = cfg.to_dict()
    for key, value in values.items():
        config_lib.apply_override(tree, f"{key}={json.dumps(value)}")
    return config_lib.from_dict(tree)


# -- the data carve --------------------------------------------------------------------------------------------
def example_in_validation(x, y, fraction):
    """Whether an example belongs to the validation part: a hash of its bytes alone, below ``fraction``."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def validation_carve(dataset, fraction):
    """The training split as ``x_train`` (fit) / ``x_test`` (validation), each example placed by its own hash."""
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"validation fraction must lie in (0, 1), got {fraction!r}")
    held = np.array([example_in_validation(x, y, fraction) for x, y in zip(dataset.x_train, dataset.y_train)])
    if held.all() or not held.any():
        raise ConfigError(f"validation fraction {fraction} of {len(held)} training examples leaves an empty part")
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[~held],
        y_train=dataset.y_train[~held],
        x_test=dataset.x_train[held],
        y_test=dataset.y_train[held],
        source=f"{dataset.source}; PRIVATE SEARCH: its training examples carved by hash {int((~held).sum())} fit / "
        f"{int(held.sum())} validation, the test split unused",
    )


# -- the search ---------------------------------------------------------------------------------------------------
def _check_searchable(cfg, out_dir):
    if os.path.exists(os.path.join(out_dir, RECORD)):
        raise RunExistsError(f"{out_dir} already holds a search ({RECORD}); choose another --out")
    if cfg.sampling.kind != "poisson":
        raise ConfigError(
            f"sampling.kind={cfg.sampling.kind!r}: a private search needs Poisson sampling (the hash carve keeps "
            "add-or-remove-one adjacency, which the shuffle sampler's replace-one accounting does not cover)"
        )
    if cfg.sampling.seed is not None:
        raise ConfigError(
            "sampling.seed: a private search needs each trial's batches drawn from fresh randomness (trials "
            "sharing a seed are not the independent runs the bound assumes); set it to null"
        )
    if cfg.dataset.validation_fraction is not None:
        raise ConfigError(
            "dataset.validation_fraction: a private search carves its own validation part (validation_fraction "
            "of tune); remove it from the config"
        )


def declared_trial_event(cfg, fit_size, score_noise):
    """The event every trial must have, from the config and the fit part's size (before any trial)."""
    policy = training.planned_policy(cfg, fit_size, training.configured_releases(cfg))
    return policy, trial_event(policy.ledger(cfg.training.epochs * policy.steps_per_epoch), score_noise)


def _check_trial_policy(trial_dir, trial_cfg, policy):
    """A trial ran under the declared policy and took at most the planned steps."""
    state = runs.read_json(trial_dir, runs.PRIVACY)
    recorded = {field.name: state[field.name] for field in dataclasses.fields(PrivacyPolicy)}
    if recorded != json.loads(json.dumps(policy.to_dict())) or state["steps"] > trial_cfg.training.epochs * (
        policy.steps_per_epoch
    ):
        raise NotPrivateError(
            "a trial ran under another privacy policy than the search declared; the search is aborted and "
            "nothing is released"
        )


def _run_trial(cfg, values, carve_path, trial_dir):
    """Trains one trial on the fit part; returns its config, model and number of correct validation predictions."""
    trial_cfg = configure(cfg, values)
    trial_cfg.dataset = dataclasses.replace(trial_cfg.dataset, name="npz", data_dir=carve_path)
    model, metrics = training.run(trial_cfg, trial_dir, verbose=0)
    return trial_cfg, model, int(round(metrics["test_accuracy"] * metrics["test_size"]))


@dataclasses.dataclass
class SearchResult:
    """What a private search released (``tune.json``'s content), and the selected model (``None`` if K = 0)."""

    record: dict
    model: object = None

    @property
    def epsilon(self):
        return self.record["epsilon"]

    def statement(self):
        return statement(self.record)


def tune(cfg, space, count, out_dir, *, score_noise=5.0, validation_fraction=0.2, seed=None, verbose=1):
    """Runs the private search of ``space`` around ``cfg`` and writes the tune folder; returns a :class:`SearchResult`.

    Args:
        cfg: The base :class:`lipdp.config.Config` (Poisson sampling).
        space: A :class:`SearchSpace` (keys outside :data:`PRIVACY_KEYS`).
        count: A :class:`TrialCount`, the distribution of the number of trials.
        out_dir: The tune folder (refused if it holds a search).
        score_noise: Standard deviation of the Gaussian noise on each trial's
            count of correct validation predictions (sensitivity 1); unused
            (no score released) when ``count`` is a single fixed trial.
        validation_fraction: Expected share of the training examples in the
            validation part.
        seed: Seeds the draws of ``K`` and of the configurations; ``None``
            (OS entropy) unless it stays secret. The score noise and the
            training noise never use it.
        verbose: 0 silent, 1 one line with the search's cost before it
            starts (nothing per trial: that would reveal K).
    """
    _check_searchable(cfg, out_dir)
    configure(cfg, space.first())  # a key or value error, before any data is read
    carve = validation_carve(data.load(cfg.dataset.name, data_dir=cfg.dataset.data_dir), validation_fraction)
    score_noise = score_noise if count.selects else None
    policy, event = declared_trial_event(cfg, len(carve.x_train), score_noise)
    epsilon = search_epsilon(event, count, policy.delta, policy.accountant)
    if not math.isfinite(epsilon):
        raise PrivacyParameterError(f"the search's epsilon is infinite for {count.describe()}; raise the noise")
    if seed is not None:
        warnings.warn("tune: seed is set; the guarantee holds only while it stays secret (it reveals K)")
    rng, noise = np.random.default_rng(seed), np.random.default_rng()  # the score noise: OS entropy, always
    trials = [space.draw(rng) for _ in range(count.draw(rng))]
    for values in trials:
        configure(cfg, values)  # every drawn configuration valid before the first trial
    if verbose:
        print(f"private search: {count.describe()}; it costs epsilon {epsilon:.4g} at delta {policy.delta:g}")
    os.makedirs(out_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="lipdp-tune-")  # private: removed whatever happens
    try:
        carve_path = os.path.join(work_dir, "carve.npz")
        np.savez(carve_path, x_train=carve.x_train, y_train=carve.y_train, x_test=carve.x_test, y_test=carve.y_test)
        best = None
        for number, values in enumerate(trials):
            trial_dir = os.path.join(work_dir, f"trial{number}")
            trial_cfg, model, correct = _run_trial(cfg, values, carve_path, trial_dir)
            _check_trial_policy(trial_dir, trial_cfg, policy)
            score = None if score_noise is None else correct + float(noise.normal(0.0, score_noise))
            if best is None or score > best[0]:
                best = (score, values, trial_dir, model)
        record = _record(cfg, space, count, policy, event, epsilon, score_noise, carve, best)
        _write_folder(cfg, out_dir, record, best)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return SearchResult(record, None if best is None else best[3])


def _record(cfg, space, count, policy, event, epsilon, score_noise, carve, best):
    validation_size = len(carve.x_test)
    return {
        "epsilon": epsilon,
        "delta": policy.delta,
        "accountant": count.accountant(policy.accountant),
        "bound": count.bound(),
        "dataset": cfg.dataset.name,
        "training_examples": len(carve.x_train) + validation_size,
        "fit_examples": len(carve.x_train),
        "validation_examples": validation_size,
        "trial_count": {"mean": float(count.mean), "shape": count.shape, "description": count.describe()},
        "trial_epsilon": float(accounting.make_accountant(policy.accountant).compose(event).get_epsilon(policy.delta)),
        "score": None
        if score_noise is None
        else {
            "released": "count of correct validation predictions + N(0, noise^2), divided by validation_examples",
            "noise": float(score_noise),
            "selected_noisy_accuracy": None if best is None else best[0] / validation_size,
        },
        "space": space.dimensions,
        "selected": None if best is None else best[1],
        "trial_event": ledger_to_json(event),
        "search_event": ledger_to_json(count.search_event(event)),
        "not_released": ("" if count.fixed else "the number of trials, which trial was selected, ")
        + "the other trials' models and scores, exact validation accuracies, training curves, the search's running "
        "time",
    }


def _write_folder(cfg, out_dir, record, best):
    """The released artefacts: the selected model and its config (if any trial ran), the record, the statement."""
    if best is not None:
        shutil.copyfile(runs.path(best[2], runs.MODEL), runs.path(out_dir, runs.MODEL))
        runs.write_text(out_dir, runs.CONFIG, yaml.safe_dump(configure(cfg, best[1]).to_dict(), sort_keys=False))
    runs.write_text(out_dir, STATEMENT, statement(record) + "\n")
    runs.write_json(out_dir, RECORD, record)  # last: marks the search complete


def statement(record):
    """The search's guarantee in words, from its ``tune.json`` record."""
    score = record["score"]
    parts = ["model (model.keras)", f"configuration (config.yaml: values {record['selected']})"]
    scoring = "; there was nothing to select, so no score was released"
    if score is not None and record["selected"] is not None:
        parts.append(f"noisy validation accuracy ({score['selected_noisy_accuracy']:.4f})")
    released = "The released " + ", its ".join(parts[:-1]) + " and its " + parts[-1]
    if record["selected"] is None:
        released = "No trial ran (K = 0), so no model is released"
    if score is not None:
        scoring = (
            f" and released its count of correct predictions on the validation part ({record['validation_examples']} "
            f"examples) plus Gaussian noise of standard deviation {score['noise']:g}; the trial with the highest "
            "noisy score was released"
        )
    return (
        f"{released}: ({record['epsilon']:.4g}, {record['delta']:.3g})-differentially private with respect to adding "
        f"or removing one of the {record['training_examples']} training examples of {record['dataset']}, for the "
        f"whole hyper-parameter search that chose them. The search ran {record['trial_count']['description']}; "
        "each trial drew a configuration from the space independently of the data, trained "
        f"one DP run on the fit part ({record['fit_examples']} examples, carved by a hash of each example)"
        f"{scoring}; one trial alone is ({record['trial_epsilon']:.4g}, {record['delta']:.3g})-DP. "
        f"Bound: {record['bound']} ({record['accountant'].upper()} accountant). Not released and not "
        "covered: "
        f"{record['not_released']}. The privacy statement stored in model.keras is one trial's, not the search's."
    )
