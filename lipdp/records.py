"""What a model's private steps were taken under: the privacy record, its fingerprint, and the refusals they drive.

The model saves :func:`fingerprint` of :func:`privacy_record` beside its step
count, so a checkpoint, backup or saved model cannot pair earlier steps with
another policy or mechanism (:func:`check_same_record`); the CLI keeps the
record itself in ``policy.json``. A data release carried by a layer (a
released ``ChannelStandardization``) must be in the policy
(:func:`check_releases_accounted`), and per-step releases need their share of the
noise (:func:`check_step_releases`).
"""

import hashlib
import json

from lipdp import backend, sampling, sensitivity
from lipdp.errors import ModelNotSupportedError, NotPrivateError
from lipdp.layers import StepRelease


def privacy_record(policy, mechanism):
    """The JSON of what a step was taken under: the privacy policy and the gradient mechanism's settings."""
    return json.dumps({"policy": policy.to_dict(), "mechanism": mechanism.get_config()}, sort_keys=True)


def record_changes(recorded, wanted):
    """``["key: old -> new", ...]`` between two records (dicts, as :func:`privacy_record` encodes; flattened keys)."""

    def flat(record, prefix=""):
        if not isinstance(record, dict):
            return {prefix: record}
        return {k: v for key, item in record.items() for k, v in flat(item, f"{prefix}{key}.").items()}

    old, new = flat(recorded), flat(wanted)
    return [
        f"{k.rstrip('.')}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def fingerprint(record):
    """A 60-bit integer hash of a :func:`privacy_record` (what the model saves beside its step count)."""
    return int(hashlib.sha256(record.encode()).hexdigest()[:15], 16)


def check_same_record(recorded, wanted, steps):
    """Refuses to go on from ``steps`` steps taken under ``recorded`` (``None``: unknown) with another record."""
    if recorded == wanted:
        return
    changes = (
        ["the earlier policy is unknown"] if recorded is None else record_changes(*map(json.loads, (recorded, wanted)))
    )
    raise ValueError(
        f"these weights already took {steps} private steps under another privacy policy or mechanism; the "
        "accountant would count those steps under the new one. Changed: " + "; ".join(changes) + ". Resume with "
        "the settings that took them, or start from fresh weights (with lipdp train: a new --out folder)"
    )


def check_releases_accounted(model, policy):
    """Refuses a policy that does not account every release carried by the model's layers (e.g. a model
    assembled from a head trained on released features without ``releases=``)."""
    accounted = list(policy.release_noise_multipliers)
    for release in model_releases(model):
        if release not in accounted:
            raise NotPrivateError(
                f"the model carries a data release (noise multiplier {release:g}, e.g. a released "
                f"ChannelStandardization) that its privacy policy does not account (releases "
                f"{list(policy.release_noise_multipliers)}); make the model private with it inside, or pass "
                "releases=(z,) to make_private"
            )
        accounted.remove(release)


def model_releases(model):
    """Noise multipliers of the data releases the model's layers carry (e.g. a released ``ChannelStandardization``)."""
    return tuple(z for layer in backend.nested_layers(model) for z in getattr(layer, "release_noise_multipliers", ()))


def statement(state, description, policy):
    """A one-paragraph, human-readable statement of the guarantee ``state`` (:meth:`privacy_state`) records.

    ``description``: the gradient mechanism's :meth:`describe`; ``policy``: the :class:`lipdp.policy.PrivacyPolicy`.
    """
    mechanism = description
    share = state.get("quantile_noise_share")
    if share is not None:
        mechanism += (
            f", with an adaptive logit clipping threshold released as a noisy quantile each step (share "
            f"{share:.3g} of the privacy: gradient multiplier {policy.gradient_noise_multiplier:.4g}, "
            f"count multiplier {policy.quantile_noise_multiplier:.4g}, composed exactly)"
        )
    releases = state["release_noise_multipliers"]
    if releases:
        mechanism += (
            f", after {len(releases)} Gaussian release(s) of training-data statistics before training (noise "
            f"multiplier(s) {', '.join(f'{z:.4g}' for z in releases)}, composed exactly)"
        )
    adjacency = sampling.sampler_class(state["sampling"]).adjacency
    return (
        f"The trained weights are ({state['epsilon']:.4g}, {state['delta']:.3g})-differentially private "
        f"with respect to {adjacency}, over {state['steps']} noisy steps on N={state['dataset_size']} examples "
        f"({state['sampling']} sampling, rate q={state['sampling_rate']:.4g}, expected batch "
        f"{state['expected_batch_size']:.1f}), Gaussian noise multiplier {state['noise_multiplier']:.4g} "
        f"({state['noise_allocation']} allocation) on {mechanism}, accounted with "
        f"dp-accounting's {state['accountant'].upper()} accountant. Training losses and metrics shown during "
        "fit are computed on private data and are not covered; hyper-parameter selection is not covered."
    )


def step_release_layers(model):
    """The model's :class:`lipdp.layers.StepRelease` layers (e.g. ``AdaptiveClipGradient``), at any depth."""
    return [layer for layer in backend.nested_layers(model) if isinstance(layer, StepRelease)]


def check_step_releases(model, policy):
    """Refuses per-step releases the policy does not account: one call of one such layer, with its noise share."""
    releasing = step_release_layers(model)
    calls = [node for node in sensitivity.graph_nodes(model) if isinstance(node.layer, StepRelease)]
    names = ", ".join(sorted({type(layer).__name__ for layer in releasing}))
    if len(releasing) > 1 or len(calls) > 1:
        raise ModelNotSupportedError(
            f"{len(releasing)} per-step release layer(s) ({names}) called {len(calls)} times: one call of one "
            "such layer per model is supported (each call would count every example once more, beyond the "
            "release's sensitivity of 1)"
        )
    if bool(releasing) != (policy.quantile_noise_share is not None):
        raise ModelNotSupportedError(
            f"a per-step release layer ({names or 'e.g. AdaptiveClipGradient'}) needs make_private(..., "
            "quantile_noise_share=r) (the share of the privacy spent on its releases), and "
            "quantile_noise_share needs such a layer"
        )
