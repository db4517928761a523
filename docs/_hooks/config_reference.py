"""The config reference, generated from the schema in :mod:`lipdp.config` at every docs build.

An mkdocs hook (``hooks:`` in ``mkdocs.yml``): ``on_page_markdown`` replaces the marker
``<!-- config-reference -->`` with one table per config section, whose keys, types and defaults are read
from the schema's dataclasses and whose choices are read from the registries ``lipdp.config`` validates
against; only the one-line descriptions below are written by hand, and ``tests/test_docs.py`` checks that
they describe exactly the schema's keys. ``python docs/_hooks/config_reference.py`` prints the reference.
"""

import dataclasses
import inspect
import os
import sys
import typing

# The checkout's lipdp, whichever lipdp the environment installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MARKER = "<!-- config-reference -->"

DESCRIPTIONS = {
    "dataset.name": "Data set to load (`lipdp.data.load`); `digits` ships with scikit-learn and needs no network.",
    "dataset.data_dir": "Local folder with the data set's files (`--data-dir` on the command line); "
    "`null` downloads where the loader can.",
    "dataset.feature_cache": "Folder caching front-end features, keyed by a hash of the data and the "
    "front-end settings; `null` recomputes them every run.",
    "dataset.validation_fraction": "Train on the first `1 - f` of the training split and evaluate on its "
    "last `f`; the test split is never loaded (honest tuning).",
    "model.input_norm": "Every input is clipped to this l2 norm by an `InputNormClip` after the front-end: "
    "the only assumption on the data.",
    "model.frontend": "A fixed per-example map before the input clip, e.g. "
    "`{type: Scattering2D, J: 2, L: 8, normalize: group, groups: 27}`; its features are cached.",
    "model.feature_statistics": "`{noise_multiplier: z, clip_norm: R, scale: false, mean_clip: null, "
    "variance_clip: null}`: centre (and with `scale: true` scale) the head's inputs per channel by one DP release "
    "of the training split's channel statistics (`lipdp.statistics`), composed into the accounting; the optional "
    "clips bound each example's vector of channel means and of squared deviations.",
    "model.layers": "The network after the input clip: a list of `{type: LayerName, **arguments}`, lipdp "
    "layers first, then Keras'.",
    "model.mechanism": "How a step gets its gradient sum and its sensitivity (`lipdp.mechanisms`): `null` is "
    "`{name: certified}`, clipless certified bounds (with augmentation multiplicity: `{name: certified, "
    "augmentation: {multiplicity: K, layers: [{type: RandomFlip, ...}]}}`); a clipping rule with its settings, "
    "e.g. `{name: flat, clip_norm: 1.0}`, `{name: automatic, gamma: 0.01}`, `{name: global, clip_norm: 0.1}`.",
    "loss.type": "A `lipdp.losses` loss (each states its Lipschitz constant in the logits).",
    "loss.params": "Arguments of the loss, e.g. `{tau: 64.0}`.",
    "privacy.target_epsilon": "Epsilon to reach after all epochs; the noise multiplier is calibrated to it "
    "(exactly one of this and `noise_multiplier`).",
    "privacy.noise_multiplier": "Gaussian noise multiplier; epsilon is computed from it (exactly one of this "
    "and `target_epsilon`).",
    "privacy.delta": "Delta of the (epsilon, delta) guarantee; must be below `1/N` (`null`: `0.1 / N`).",
    "privacy.accountant": "dp-accounting accountant: Rényi DP or privacy-loss distributions.",
    "privacy.noise_allocation": "Clipless noise per variable: `sigma ‖C‖` on every coordinate (`global`, `C` the "
    "variables' bounds) or `sigma sqrt(k) C_i` on variable `i` of `k` (`per-layer`); the same accounted event.",
    "privacy.epsilon_budget": "Stop training (`BudgetStop`) once the spent epsilon would exceed this.",
    "privacy.quantile_noise_share": "Share of the accounted noise given to an `AdaptiveClipGradient`'s "
    "per-step count release.",
    "sampling.kind": "`poisson` (amplification by subsampling) or `shuffle` (fixed-size batches, accounted "
    "without amplification).",
    "sampling.batch_size": "Expected batch size `qN` (Poisson) or the batch size (shuffle).",
    "sampling.seed": "Seed of the batch sampler; `null` draws from OS entropy. A set seed reproduces the "
    "batches and must stay secret.",
    "optimizer.name": "A Keras optimizer (`adam`, `sgd`, `rmsprop`, ...).",
    "optimizer.learning_rate": "Learning rate (peak of the decay, when there is one).",
    "optimizer.params": "The optimizer's other arguments, e.g. `{momentum: 0.9}` (post-processing, no privacy cost).",
    "optimizer.decay": "`cosine`: the learning rate falls to 0 along a half cosine over the planned steps.",
    "optimizer.ema_momentum": "Exponential moving average of the weights, swapped in when `fit` ends "
    "(post-processing, no privacy cost).",
    "training.epochs": "Epochs to train; an epoch is `ceil(N / B)` Poisson steps or `N // B` shuffled batches.",
    "training.seed": "Seed of the initial weights only (public); the DP noise never uses it.",
    "training.microbatch_size": "Accumulate each step's gradient sums over micro-batches of this size "
    "(flat memory; noise once per step).",
    "training.strategy": "`tf.distribute` strategy: one device, the devices of one machine, or machines "
    "from `TF_CONFIG`.",
    "training.logical_cpus": "Split the CPU into this many logical devices first (to try `mirrored` on a "
    "CPU-only host).",
    "evaluation.certified_radii": "l2 radii, in units of the raw model input, at which `metrics.json` and the "
    "report give the certified accuracy (`lipdp.robustness`); `null`: 0, 1/32, 1/16, 1/8 and 1/4 of "
    "`model.input_norm`.",
}


def _choices():
    """The accepted values of the keys ``lipdp.config`` checks against a list, read from the same registries."""
    from lipdp import accounting, config, data, distribute, losses, mechanisms, policy

    loss_names = [
        name
        for name, cls in vars(losses).items()
        if inspect.isclass(cls) and issubclass(cls, losses.LipschitzLoss) and cls is not losses.LipschitzLoss
    ]
    return {
        "dataset.name": tuple(data.DATASETS),
        "model.mechanism": tuple(mechanisms.registered()),
        "loss.type": tuple(loss_names),
        "privacy.accountant": accounting.ACCOUNTANTS,
        "privacy.noise_allocation": policy.NOISE_ALLOCATIONS,
        "sampling.kind": accounting.SAMPLINGS,
        "optimizer.decay": config.LEARNING_RATE_DECAYS,
        "training.strategy": distribute.STRATEGIES,
    }


def schema_fields():
    """``(section, field)`` for every key of the config schema, in schema order."""
    from lipdp import config

    hints = typing.get_type_hints(config.Config)
    return [
        (section.name, field)
        for section in dataclasses.fields(config.Config)
        for field in dataclasses.fields(hints[section.name])
    ]


def _type_name(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_type_name(a) for a in options) + " or null"
    if origin is list:
        return "list"
    if origin is dict:
        return "mapping"
    return {float: "number", int: "integer", str: "string", bool: "true/false"}.get(annotation, str(annotation))


def _yaml_value(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == [] or value == {}:
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def _default(field):
    if field.default_factory is not dataclasses.MISSING:
        return _yaml_value(field.default_factory())
    return _yaml_value(field.default)


def generate():
    """The config reference as Markdown: one table per section."""
    from lipdp import config

    hints = typing.get_type_hints(config.Config)
    choices = _choices()
    lines = []
    for section in dataclasses.fields(config.Config):
        schema = hints[section.name]
        field_hints = typing.get_type_hints(schema)
        lines += [f"## `{section.name}`", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for field in dataclasses.fields(schema):
            key = f"{section.name}.{field.name}"
            description = DESCRIPTIONS.get(key, "")
            if key in choices:
                description += (
                    (" Names: " if key == "model.mechanism" else " One of: ")
                    + ", ".join(f"`{_yaml_value(c)}`" for c in choices[key])
                    + "."
                )
            lines.append(
                f"| `{field.name}` | {_type_name(field_hints[field.name])} | `{_default(field)}` | {description} |"
            )
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown, page, **kwargs):
    """mkdocs hook: fills the marker of the config reference page."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, generate())


if __name__ == "__main__":
    print(generate())
