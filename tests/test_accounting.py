import json
import math
import re

import dp_accounting
import numpy as np
import pytest
from scipy import optimize, stats

from lipdp import accounting
from lipdp.errors import PrivacyParameterError
from lipdp.ledger import ledger_from_json, ledger_to_json

# (dataset size, batch size, noise multiplier, epochs, delta)
SETTINGS = [
    (60000, 256, 1.1, 60, 1e-5),
    (50000, 512, 2.0, 20, 1e-5),
    (10000, 100, 0.8, 5, 1e-5),
    (1000, 50, 4.0, 100, 1e-4),
]


def _tfp_lib():
    """tensorflow_privacy's DP-SGD privacy computations, for cross-checks; the test is skipped without them."""
    return pytest.importorskip(
        "tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib",
        reason="tensorflow_privacy is not installed (optional: it pins TensorFlow <= 2.15 and NumPy 1)",
    )


def _statement_epsilons(n, batch, sigma, epochs, delta, microbatching, accountant):
    """(once-per-epoch epsilon, Poisson epsilon) printed by tensorflow_privacy, 3 decimals."""
    tfp_lib = _tfp_lib()
    text = tfp_lib.compute_dp_sgd_privacy_statement(
        n,
        batch,
        epochs,
        sigma,
        delta,
        used_microbatching=microbatching,
        accountant_type=tfp_lib.AccountantType[accountant.upper()],
    )
    once = re.search(r"once per epoch:\s+([0-9.]+)", text).group(1)
    poisson = re.search(r"Poisson sampling \(\*\):\s+([0-9.]+)", text).group(1)
    return float(once), float(poisson)


@pytest.mark.parametrize("n,batch,sigma,epochs,delta", SETTINGS)
def test_poisson_rdp_matches_tensorflow_privacy(n, batch, sigma, epochs, delta):
    tfp_lib = _tfp_lib()
    q = batch / n
    steps = math.ceil(epochs / q)
    ours = accounting.compute_epsilon(sampling_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
    # compute_dp_sgd_privacy uses a coarser order list: it can only be looser, and not by much.
    legacy, _ = tfp_lib.compute_dp_sgd_privacy(n, batch, sigma, epochs, delta)
    assert ours <= legacy * (1 + 1e-12)
    assert ours == pytest.approx(legacy, rel=1e-2)
    # The privacy statement uses dp_accounting's default orders, as we do (printed to 3 decimals).
    _, statement = _statement_epsilons(n, batch, sigma, epochs, delta, False, "rdp")
    assert ours == pytest.approx(statement, abs=6e-4)


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_statement_agrees_for_both_samplings(accountant):
    # Large noise keeps PLD fast.
    n, batch, sigma, epochs, delta = 20000, 200, 6.0, 15, 1e-5
    q, steps_per_epoch = batch / n, n // batch
    once, poisson = _statement_epsilons(n, batch, sigma, epochs, delta, True, accountant)
    # tensorflow_privacy halves sigma for microbatching, as replace-one adjacency does for shuffling.
    shuffle = accounting.compute_epsilon(
        sampling_rate=q,
        noise_multiplier=sigma,
        steps=epochs * steps_per_epoch,
        delta=delta,
        accountant=accountant,
        sampling="shuffle",
        steps_per_epoch=steps_per_epoch,
    )
    assert shuffle == pytest.approx(once, abs=6e-4)
    # Its Poisson figure also used sigma / 2.
    halved = accounting.compute_epsilon(
        sampling_rate=q, noise_multiplier=sigma / 2, steps=math.ceil(epochs / q), delta=delta, accountant=accountant
    )
    assert halved == pytest.approx(poisson, abs=6e-4)


@pytest.mark.parametrize(
    "accountant,direct", [("rdp", dp_accounting.rdp.RdpAccountant), ("pld", dp_accounting.pld.PLDAccountant)]
)
def test_matches_dp_accounting_directly(accountant, direct):
    q, sigma, steps, delta = 0.01, 2.5, 3000, 1e-6
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    expected = direct().compose(event).get_epsilon(delta)
    ours = accounting.compute_epsilon(
        sampling_rate=q, noise_multiplier=sigma, steps=steps, delta=delta, accountant=accountant
    )
    assert ours == pytest.approx(expected, rel=1e-9)
    assert accounting.training_event(sampling_rate=q, noise_multiplier=sigma, steps=steps) == event


def test_rdp_and_pld_are_close_and_pld_is_tighter():
    kwargs = dict(sampling_rate=0.02, noise_multiplier=2.0, steps=2000, delta=1e-5)
    rdp = accounting.compute_epsilon(accountant="rdp", **kwargs)
    pld = accounting.compute_epsilon(accountant="pld", **kwargs)
    assert 0.8 * rdp < pld < rdp


def _analytic_gaussian_delta(epsilon, sigma):
    """Exact delta(epsilon) of a sensitivity-1 Gaussian mechanism (Balle & Wang 2018, Thm 8)."""
    return stats.norm.cdf(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * stats.norm.cdf(
        -0.5 / sigma - epsilon * sigma
    )


@pytest.mark.parametrize("accountant,slack", [("pld", 0.01), ("rdp", 0.25)])
def test_shuffle_matches_exact_gaussian_with_doubled_sensitivity(accountant, slack):
    sigma, epochs, steps_per_epoch, delta = 4.0, 9, 50, 1e-5
    eps = accounting.compute_epsilon(
        sampling_rate=0.02,
        noise_multiplier=sigma,
        steps=epochs * steps_per_epoch,
        delta=delta,
        accountant=accountant,
        sampling="shuffle",
        steps_per_epoch=steps_per_epoch,
    )
    # 9 epochs of noise sigma at sensitivity 2 = one Gaussian of std sigma / 2 / sqrt(9) at sensitivity 1.
    effective = sigma / 2 / math.sqrt(epochs)
    exact = optimize.brentq(lambda e: _analytic_gaussian_delta(e, effective) - delta, 0, 100)
    assert exact * (1 - 1e-6) <= eps <= exact * (1 + slack)  # a valid bound, and a tight one


def test_zero_steps_costs_nothing():
    event = accounting.training_event(sampling_rate=0.1, noise_multiplier=1.0, steps=0)
    assert isinstance(event, dp_accounting.NoOpDpEvent)
    for accountant in accounting.ACCOUNTANTS:
        assert (
            accounting.compute_epsilon(
                sampling_rate=0.1, noise_multiplier=1.0, steps=0, delta=1e-5, accountant=accountant
            )
            == 0.0
        )


def test_shuffle_epsilon_is_per_epoch():
    kwargs = dict(sampling_rate=0.01, noise_multiplier=3.0, delta=1e-5, sampling="shuffle", steps_per_epoch=100)

    def eps(steps):
        return accounting.compute_epsilon(steps=steps, **kwargs)

    assert eps(1) == eps(50) == eps(100)
    assert eps(100) < eps(101) == eps(200) < eps(201)
    assert accounting.training_event(
        steps=250, **{k: v for k, v in kwargs.items() if k != "delta"}
    ) == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 3)
    # Without amplification by subsampling, shuffling costs far more than Poisson sampling.
    poisson = accounting.compute_epsilon(sampling_rate=0.01, noise_multiplier=3.0, delta=1e-5, steps=1000)
    assert eps(1000) > 2 * poisson


@pytest.mark.parametrize(
    "accountant,sampling,target",
    [
        ("rdp", "poisson", 2.0),
        ("rdp", "shuffle", 2.0),
        ("pld", "poisson", 0.5),  # PLD is slow at small noise multipliers
    ],
)
def test_calibrate_noise_multiplier_meets_target(accountant, sampling, target):
    common = dict(
        delta=1e-5, sampling_rate=0.01, steps=1000, accountant=accountant, sampling=sampling, steps_per_epoch=100
    )
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=target, **common)
    eps = accounting.compute_epsilon(noise_multiplier=sigma, **common)
    assert 0.98 * target <= eps <= target


@pytest.mark.parametrize("sampling,known", [("poisson", 1.7), ("shuffle", 17.0)])
def test_calibrate_noise_multiplier_recovers_known_noise(sampling, known):
    common = dict(delta=1e-5, sampling_rate=0.01, steps=1000, sampling=sampling, steps_per_epoch=100)
    known_eps = accounting.compute_epsilon(noise_multiplier=known, **common)
    assert accounting.calibrate_noise_multiplier(target_epsilon=known_eps, **common) == pytest.approx(known, rel=1e-4)


def test_calibrate_impossible_target():
    with pytest.raises(PrivacyParameterError, match="target_epsilon.*fewer"):
        accounting.calibrate_noise_multiplier(target_epsilon=0.01, delta=1e-5, sampling_rate=1.0, steps=10**6)


def test_calibrate_loose_target_stops_at_minimum_noise():
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=1e4, delta=1e-5, sampling_rate=0.01, steps=10)
    assert sigma == 1 / 16


@pytest.mark.parametrize("budget,sigma,q", [(1.0, 1.0, 0.01), (2.0, 1.0, 0.005)])
def test_max_steps_is_exact(budget, sigma, q):
    common = dict(delta=1e-5, sampling_rate=q, noise_multiplier=sigma)
    steps = accounting.max_steps(epsilon_budget=budget, **common)
    assert steps > 0
    assert accounting.compute_epsilon(steps=steps, **common) <= budget
    assert accounting.compute_epsilon(steps=steps + 1, **common) > budget


def test_max_steps_shuffle_is_whole_epochs():
    common = dict(delta=1e-5, sampling_rate=0.02, noise_multiplier=6.0, sampling="shuffle", steps_per_epoch=50)
    steps = accounting.max_steps(epsilon_budget=2.0, **common)
    assert steps > 0 and steps % 50 == 0
    assert (
        accounting.compute_epsilon(steps=steps, **common) <= 2.0 < accounting.compute_epsilon(steps=steps + 1, **common)
    )
    assert accounting.epochs_for_budget(epsilon_budget=2.0, **common) == steps // 50


def test_max_steps_edges():
    common = dict(delta=1e-5, sampling_rate=0.01, noise_multiplier=0.5)
    assert accounting.compute_epsilon(steps=1, **common) > 0.1
    assert accounting.max_steps(epsilon_budget=0.1, **common) == 0
    assert accounting.max_steps(epsilon_budget=1e6, upper=1000, **common) == 1000


def test_epochs_for_budget_poisson():
    common = dict(delta=1e-5, sampling_rate=0.01, noise_multiplier=1.5)
    epochs = accounting.epochs_for_budget(epsilon_budget=1.5, steps_per_epoch=100, **common)
    assert epochs > 0
    assert accounting.compute_epsilon(steps=100 * epochs, **common) <= 1.5
    assert accounting.compute_epsilon(steps=100 * (epochs + 1), **common) > 1.5


def test_validate_delta():
    accounting.validate_delta(1e-5, 60000)
    for delta, size in [(1 / 1000, 1000), (0.01, 1000), (0.5, 3)]:
        with pytest.raises(PrivacyParameterError, match=r"1/dataset_size.*1/\(10 N\)"):
            accounting.validate_delta(delta, size)
    for delta in (0, -1e-5, 1.0):
        with pytest.raises(PrivacyParameterError, match="delta"):
            accounting.validate_delta(delta, 1000)
    with pytest.raises(PrivacyParameterError, match="dataset_size"):
        accounting.validate_delta(1e-5, 0)


VALID = dict(sampling_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5)


@pytest.mark.parametrize(
    "override,name",
    [
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(sampling_rate=0.0), "sampling_rate"),
        (dict(sampling_rate=1.5), "sampling_rate"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sampling="fixed"), "sampling"),
        (dict(accountant="moments"), "accountant.*rdp, pld"),
        (dict(sampling="shuffle"), "steps_per_epoch"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
    ],
)
def test_compute_epsilon_rejects_invalid(override, name):
    with pytest.raises(PrivacyParameterError, match=name):
        accounting.compute_epsilon(**{**VALID, **override})


def test_other_functions_reject_invalid():
    with pytest.raises(PrivacyParameterError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(target_epsilon=0, delta=1e-5, sampling_rate=0.01, steps=10)
    with pytest.raises(PrivacyParameterError, match="steps"):
        accounting.calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=0)
    with pytest.raises(PrivacyParameterError, match="epsilon_budget"):
        accounting.max_steps(epsilon_budget=-1.0, delta=1e-5, sampling_rate=0.01, noise_multiplier=1.0)
    with pytest.raises(PrivacyParameterError, match="noise_multiplier"):
        accounting.max_steps(epsilon_budget=1.0, delta=1e-5, sampling_rate=0.01, noise_multiplier=0)
    with pytest.raises(PrivacyParameterError, match="accountant"):
        accounting.make_accountant("gdp")
    assert isinstance(accounting.make_accountant("pld"), dp_accounting.pld.PLDAccountant)
    assert isinstance(accounting.make_accountant(), dp_accounting.rdp.RdpAccountant)


def test_ledger_json_round_trip():
    poisson = accounting.training_event(sampling_rate=0.01, noise_multiplier=np.float64(1.3), steps=np.int64(40))
    shuffle = accounting.training_event(
        sampling_rate=0.01, noise_multiplier=3.0, steps=250, sampling="shuffle", steps_per_epoch=100
    )
    ledger = dp_accounting.ComposedDpEvent([poisson, dp_accounting.NoOpDpEvent(), shuffle])
    data = json.loads(json.dumps(ledger_to_json(ledger)))
    assert data["class_name"] == "ComposedDpEvent"
    restored = ledger_from_json(data)
    assert restored == ledger
    assert restored != dp_accounting.ComposedDpEvent([poisson, shuffle])
    assert accounting.make_accountant().compose(restored).get_epsilon(1e-5) == accounting.make_accountant().compose(
        ledger
    ).get_epsilon(1e-5)


def test_ledger_from_json_rejects_non_events():
    for bad in ({"class_name": "importlib"}, {"class_name": "Mapping"}, {"noise_multiplier": 1.0}):
        with pytest.raises(PrivacyParameterError, match="not a dp_accounting event"):
            ledger_from_json(bad)


def test_max_steps_with_pld_is_exact_and_never_evaluates_huge_step_counts(monkeypatch):
    args = dict(delta=1e-5, sampling_rate=0.1, noise_multiplier=2.0, accountant="pld")
    budget = accounting.compute_epsilon(steps=40, **args) * 1.0001
    evaluated = []
    real = accounting.compute_epsilon

    def recording(**kwargs):
        evaluated.append(kwargs["steps"])
        return real(**kwargs)

    monkeypatch.setattr(accounting, "compute_epsilon", recording)
    steps = accounting.max_steps(epsilon_budget=budget, **args)
    assert steps == 40
    assert real(steps=41, **args) > budget
    # PLD at 10**7 steps takes minutes: the search must stay near the answer
    assert max(evaluated) <= 64


def test_unconverged_order_notes_of_dp_accounting_are_dropped_not_the_bound(caplog):
    """Large q: dp-accounting >= 0.6 warns per small order it leaves out; lipdp drops the note, epsilon is unchanged."""
    import logging

    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.237477, dp_accounting.GaussianDpEvent(2.0)), 100
    )
    with caplog.at_level(logging.WARNING):
        epsilon = accounting.compute_epsilon(sampling_rate=0.237477, noise_multiplier=2.0, steps=100, delta=1e-4)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    assert epsilon == dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-4)
