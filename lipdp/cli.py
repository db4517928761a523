"""The ``lipdp`` command line.

``lipdp train CONFIG [--set key=value ...] [--out DIR] [--data-dir DIR]``
    trains from a YAML config and writes the run folder (see
    :mod:`lipdp.training`).
``lipdp privacy --dataset-size N --batch-size B --epochs E
(--noise-multiplier S | --target-epsilon EPS) --delta D``
    prints epsilon, or the noise multiplier that reaches a target.
``lipdp report RUN_DIR [--no-audit] [--public] [--data-dir DIR]``
    writes ``report.html`` and ``report.md`` into a run folder (see
    :mod:`lipdp.reports`); ``--public`` writes ``public-report.*`` without the
    sections computed from private training records.
``lipdp audit RUN_DIR [--seed S] [--data-dir DIR]``
    runs the membership-inference audit and writes ``audit.json`` (see
    :mod:`lipdp.audit`).
``lipdp tune CONFIG --space SPACE.yaml --private [--mean-trials K] [--shape S] [--score-noise SIGMA] [--out DIR]``
    a private hyper-parameter search: a random number of DP trials, the best
    one released with the search's (epsilon, delta) (see :mod:`lipdp.tuning`).
``lipdp audit-canaries CONFIG --canaries M [--kind gradient|input] [--guesses R] [--seed S] [--set key=value ...]
[--out DIR] [--data-dir DIR]``
    trains the config's model with canaries and writes the one-run epsilon
    lower bound to ``canary_audit.json`` (see :mod:`lipdp.canaries`).
``lipdp certify RUN_DIR [--radii R ...] [--data-dir DIR]``
    prints the model's certified l2 Lipschitz constant and its certified
    accuracy on the test split at each radius (see :mod:`lipdp.robustness`).
"""

import argparse
import os
import sys


def _train(args):
    from lipdp import config, training

    cfg = config.load(args.config, args.set or [])
    if args.data_dir:
        cfg.dataset.data_dir = args.data_dir  # a path, not a YAML value
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    model, metrics = training.run(cfg, out, verbose=args.verbose)
    print(
        f"\ntest accuracy {metrics['test_accuracy']:.4f} on {metrics['test_size']} held-out examples "
        f"({metrics['data']})"
    )
    print(model.privacy_statement())
    print(f"artefacts written to {out}/")


def _round_up(value, digits=6):
    """``value`` to ``digits`` significant digits, rounded up: a printed noise multiplier keeps the target."""
    shown = float(f"{value:.{digits}g}")
    return shown if shown >= value else float(f"{value * (1 + 10.0 ** (1 - digits)):.{digits}g}")


def _privacy(args):
    from lipdp import accounting, sampling

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise SystemExit("give exactly one of --noise-multiplier and --target-epsilon")
    accounting.validate_delta(args.delta, args.dataset_size)
    if not 0 < args.batch_size <= args.dataset_size:
        raise SystemExit(f"--batch-size must be in 1..{args.dataset_size}")
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    rate = args.batch_size / args.dataset_size
    steps_per_epoch = sampling.steps_per_epoch(args.sampling, args.dataset_size, args.batch_size)
    common = dict(
        delta=args.delta,
        sampling_rate=rate,
        steps=args.epochs * steps_per_epoch,
        accountant=args.accountant,
        sampling=args.sampling,
        steps_per_epoch=steps_per_epoch,
        releases=tuple(args.release),
    )
    releases = f", after releases with noise multipliers {list(args.release)}" if args.release else ""
    print(
        f"sampling: {args.sampling}, rate q={rate:.6g}, {common['steps']} steps "
        f"({steps_per_epoch} per epoch){releases}, accountant: {args.accountant}"
    )
    if args.noise_multiplier is not None:
        epsilon = accounting.compute_epsilon(noise_multiplier=args.noise_multiplier, **common)
        print(f"epsilon = {epsilon:.6g} at delta = {args.delta:g} with noise multiplier {args.noise_multiplier:g}")
    else:
        sigma = _round_up(accounting.calibrate_noise_multiplier(target_epsilon=args.target_epsilon, **common))
        epsilon = accounting.compute_epsilon(noise_multiplier=sigma, **common)  # of the printed value
        print(
            f"noise multiplier = {sigma:.6g} reaches epsilon = {epsilon:.6g} <= {args.target_epsilon:g} "
            f"at delta = {args.delta:g}"
        )


def _report(args):
    from lipdp import reports, runs

    paths = reports.make_report(
        runs.require_complete(args.run_dir), audit=not args.no_audit, data_dir=args.data_dir, public=args.public
    )
    print(f"report written to {paths['html']} and {paths['md']}")


def _audit(args):
    from lipdp import audit, runs

    result = audit.audit_run(runs.require_complete(args.run_dir), seed=args.seed, data_dir=args.data_dir)
    print(audit.summary(result))
    print(f"written to {runs.path(args.run_dir, runs.AUDIT)}")


def _tune(args):
    from lipdp import config, search_cost, tuning
    from lipdp.errors import NotPrivateError

    if not args.private:
        raise NotPrivateError(
            "lipdp tune searches on the private training data and needs --private: it then runs a random number of "
            "DP trials, scores each with noise and accounts the whole search (lipdp.tuning). A search without that "
            "accounting is outside the guarantee; lipdp does not offer one (experiments/tune.py does, on a carve, "
            "for development only)"
        )
    cfg = config.load(args.config, args.set or [])
    if args.data_dir:
        cfg.dataset.data_dir = args.data_dir  # a path, not a YAML value
    out = args.out or os.path.join("runs", "tune-" + os.path.splitext(os.path.basename(args.config))[0])
    result = tuning.tune(
        cfg,
        tuning.SearchSpace.load(args.space),
        search_cost.TrialCount(args.mean_trials, args.shape),
        out,
        score_noise=args.score_noise,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
    )
    print(result.statement())
    print(f"written to {out}/")


def _audit_canaries(args):
    from lipdp import canaries, config, one_run_test

    cfg = config.load(args.config, args.set or [])
    if args.data_dir:
        cfg.dataset.data_dir = args.data_dir
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = canaries.audit_config(
        cfg, out, args.canaries, kind=args.kind, guesses=args.guesses, seed=args.seed, verbose=args.verbose
    )
    print(one_run_test.summary(result))
    print(f"written to {os.path.join(out, canaries.RESULT)}")


def _certify(args):
    from lipdp import config, robustness, runs

    run = runs.load_run(args.run_dir, data_dir=args.data_dir)
    radii = args.radii if args.radii is not None else config.certified_radii(run.config)
    dataset = run.dataset()
    print(robustness.certified_accuracy(run.model, dataset.x_test, dataset.y_test, radii).summary())


def _config_command(commands, name, help, out_help):
    """A subcommand run from a YAML config: the config, ``--set`` overrides, ``--out`` and ``--data-dir``."""
    command = commands.add_parser(name, help=help)
    command.add_argument("config")
    command.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    command.add_argument("--out", help=out_help)
    command.add_argument("--data-dir", help="local folder with the dataset files")
    return command


def _run_folder_command(commands, name, help):
    """A subcommand on a completed run folder, whose dataset may be read from another ``--data-dir``."""
    command = commands.add_parser(name, help=help)
    command.add_argument("run_dir")
    command.add_argument("--data-dir", help="local folder with the dataset files (overrides the run's config)")
    return command


def parser():
    main = argparse.ArgumentParser(prog="lipdp", description="Differentially private Lipschitz networks")
    commands = main.add_subparsers(dest="command", required=True)

    train = _config_command(commands, "train", "train from a YAML config", "run folder (default runs/<config name>)")
    train.add_argument("--verbose", type=int, default=1, help="Keras verbosity: 0 silent, 1 progress bar, 2 lines")
    train.set_defaults(func=_train)

    privacy = commands.add_parser("privacy", help="epsilon for a noise level, or the noise for a target epsilon")
    privacy.add_argument("--dataset-size", type=int, required=True)
    privacy.add_argument("--batch-size", type=int, required=True, help="expected batch size")
    privacy.add_argument(
        "--epochs",
        type=int,
        required=True,
        help="whole epochs; an epoch is ceil(N / B) Poisson steps or N // B shuffled batches",
    )
    privacy.add_argument("--noise-multiplier", type=float)
    privacy.add_argument("--target-epsilon", type=float)
    privacy.add_argument("--delta", type=float, required=True)
    privacy.add_argument("--accountant", default="rdp", choices=("rdp", "pld"))
    privacy.add_argument("--sampling", default="poisson", choices=("poisson", "shuffle"))
    privacy.add_argument(
        "--release",
        type=float,
        action="append",
        default=[],
        metavar="Z",
        help="noise multiplier of a statistics release before training (model.feature_statistics), repeatable",
    )
    privacy.set_defaults(func=_privacy)

    report = _run_folder_command(commands, "report", "HTML and Markdown report of a run folder")
    report.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit if not done")
    report.add_argument(
        "--public",
        action="store_true",
        help="leave out what private training records were used for (train curves, audit); "
        "writes public-report.html / .md",
    )
    report.set_defaults(func=_report)

    audit = _run_folder_command(commands, "audit", "membership-inference audit of a run folder (writes audit.json)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the member / non-member balancing")
    audit.set_defaults(func=_audit)

    tune = _config_command(
        commands,
        "tune",
        "private hyper-parameter search (a random number of DP trials)",
        "tune folder (default runs/tune-<config name>)",
    )
    tune.add_argument("--space", required=True, help="YAML: config keys and their values or ranges")
    tune.add_argument("--private", action="store_true", help="required: account the search (lipdp.tuning)")
    tune.add_argument("--mean-trials", type=float, default=10.0, help="mean number of trials K")
    tune.add_argument(
        "--shape",
        default="geometric",
        help="distribution of K: geometric, logarithmic, poisson, a truncated negative binomial shape >= 0, "
        "or fixed (exactly --mean-trials trials, composed)",
    )
    tune.add_argument(
        "--score-noise", type=float, default=5.0, help="noise std on each trial's count of correct validation answers"
    )
    tune.add_argument("--validation-fraction", type=float, default=0.2, help="share of training examples scored on")
    tune.add_argument("--seed", type=int, help="seeds K and the configurations; must stay secret (default: OS entropy)")
    tune.set_defaults(func=_tune)
    canary = _config_command(
        commands,
        "audit-canaries",
        "one-run epsilon lower bound from canaries (writes canary_audit.json)",
        "folder for canary_audit.json (default runs/<config name>)",
    )
    canary.add_argument("--canaries", type=int, required=True, help="number of canaries m, each included w.p. 1/2")
    canary.add_argument("--kind", default="gradient", choices=("gradient", "input"))
    canary.add_argument("--guesses", type=int, help="guesses r, fixed in advance (default: m/5, half each way)")
    canary.add_argument("--seed", type=int, help="seed of the canaries (coins, coordinates, draws)")
    canary.add_argument("--verbose", type=int, default=0, help="Keras verbosity of the canary run")
    canary.set_defaults(func=_audit_canaries)
    certify = _run_folder_command(commands, "certify", "certified l2 accuracy of a run's model on its test split")
    certify.add_argument(
        "--radii", type=float, nargs="+", help="l2 radii in model input units (default: evaluation.certified_radii)"
    )
    certify.set_defaults(func=_certify)
    return main


def main(argv=None):
    args = parser().parse_args(argv)
    from lipdp.errors import LipdpError

    try:
        args.func(args)
    except (LipdpError, ValueError) as error:  # lipdp's refusals (config, privacy, model, data, budget) and
        print(f"lipdp: error: {error}", file=sys.stderr)  # the ValueErrors of layer arguments in a config
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
