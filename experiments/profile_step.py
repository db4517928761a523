"""Where the time of one clipless DP train step goes (the CNN of ``configs/mnist_conv.yaml``).

Times, each as the median of ``--steps`` calls after warm-up, every piece compiled with
``tf.function`` as it is inside the train step:

* ``full step``: ``model.train_on_batch`` of the clipless DP model (what a benchmark times:
  Keras' data adapter for the batch, the compiled train function, metrics);
* ``train function``: the compiled train function alone, on a batch already in a tensor;
* ``forward``: ``model(x, training=True)``;
* ``forward + backward``: the summed per-sample loss and its gradient (the clipless
  mechanism's gradient sums, without the bounds);
* ``certified bounds``: :func:`lipdp.sensitivity.gradient_bound_tensors` (the float64 spectral
  norms of every kernel and the bound propagation);
* ``noise``: the Gaussian noise for every variable, scaled and divided by ``qN``;
* ``constraint projection``: every variable's Keras constraint, assigned (what the optimizer
  runs after its update);
* ``optimizer update``: the optimizer's update on copies of the variables without constraints;
* ``input pipeline``: one batch from the Poisson sampler's ``tf.data`` pipeline, when the
  step does not overlap it (``fit`` prefetches it).

The pieces are timed separately, so their sum differs from the full step by the overlap and
the overhead of separate calls. ``--trace DIR`` also writes a TensorFlow profiler trace of a
few full steps (TensorBoard's profile plugin reads it) and prints the op types that took the
most host time in it.

    python experiments/profile_step.py --batch-size 256 --out experiments/results/profile_step.md
"""

import argparse
import collections
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import optrace
import tensorflow as tf

import lipdp
from lipdp import config as config_lib
from lipdp import keras, sensitivity, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mnist_conv.yaml")


def median_ms(fn, steps, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def build(x, y, batch, layers=None):
    """The clipless DP model of the config's CNN (or of ``layers``) and its Poisson sampler."""
    keras.utils.set_random_seed(0)
    cfg = config_lib.load(CONFIG)
    model = lipdp.DPSequential(layers if layers is not None else training.build_layers(cfg, x.shape[1:]))
    model.compile(keras.optimizers.Adam(1e-3), loss=lipdp.losses.TauCategoricalCrossentropy(cfg.loss.params["tau"]))
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=batch)
    model.make_private(sampler, noise_multiplier=1.0)
    model.allow_unaccounted_steps()  # timed on a fixed batch: no accounting
    return model, sampler


def sync(result):
    """Forces the values (``tf.function`` calls return when the work is done on CPU, but be explicit)."""
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()


def pieces(model, sampler, xb, yb, steps):
    x_t, y_t = tf.constant(xb), tf.constant(yb)
    variables = model.trainable_variables

    @tf.function
    def forward(x):
        return model(x, training=True)

    @tf.function
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model.loss.call(y, model(x, training=True)))
        return tape.gradient(loss, variables)

    @tf.function
    def bounds():
        return sensitivity.gradient_bound_tensors(model)

    grads = forward_backward(x_t, y_t)
    sens = bounds()

    generator = tf.random.Generator.from_non_deterministic_state()
    expected_batch = float(len(xb))

    @tf.function
    def noise():  # what the private step does: one Gaussian draw per entry, scaled, divided by qN
        return [(g + generator.normal(tf.shape(g)) * tf.cast(s, g.dtype)) / expected_batch for g, s in zip(grads, sens)]

    @tf.function
    def project():
        for v in variables:
            if v.constraint is not None:
                v.assign(v.constraint(v))

    plain_vars = [tf.Variable(v.numpy(), name=f"copy{i}") for i, v in enumerate(variables)]
    optimizer = keras.optimizers.Adam(1e-3)

    @tf.function
    def update():
        optimizer.apply_gradients(zip(grads, plain_vars))

    model.train_on_batch(xb, yb)  # builds the train function
    train_function = model.make_train_function()
    batches = iter(tf.data.Dataset.from_tensors((x_t, y_t)).repeat())

    iterator = iter(sampler.dataset())

    rows = [
        ("full step (`train_on_batch`)", median_ms(lambda: model.train_on_batch(xb, yb), steps)),
        ("train function (batch already a tensor)", median_ms(lambda: sync(train_function(batches)), steps)),
        ("forward", median_ms(lambda: sync(forward(x_t)), steps)),
        ("forward + backward (gradient sums)", median_ms(lambda: sync(forward_backward(x_t, y_t)), steps)),
        ("certified bounds (float64 spectral norms + propagation)", median_ms(lambda: sync(bounds()), steps)),
        ("noise (all variables)", median_ms(lambda: sync(noise()), steps)),
        ("constraint projection (all kernels)", median_ms(project, steps)),
        ("optimizer update (Adam, no constraints)", median_ms(update, steps)),
        ("input pipeline (one Poisson batch, not overlapped)", median_ms(lambda: next(iterator), steps)),
    ]
    per_layer = []
    for v in variables:
        if v.constraint is not None:

            @tf.function
            def one(v=v):
                v.assign(v.constraint(v))

            shape = "x".join(str(d) for d in v.shape)
            per_layer.append((f"projection of `{v.name}` ({shape})", median_ms(one, steps)))
    for layer in model.layers:
        if hasattr(layer, "lipschitz_constant") and layer.trainable_weights:

            @tf.function
            def norm(layer=layer):
                return layer.lipschitz_constant()

            per_layer.append((f"certified norm of `{layer.name}`", median_ms(lambda f=norm: sync(f()), steps)))
    return rows, per_layer


def interleaved_ms(calls, steps, warmup=5):
    """Median ms of each callable, timed in turns (A, B, C, A, B, C, ...) so that load drift hits all alike."""
    for fn in calls:
        for _ in range(warmup):
            fn()
    times = [[] for _ in calls]
    for _ in range(steps):
        for fn, record in zip(calls, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def what_if(x, y, xb, yb, steps):
    """Full-step times of variants of the clipless DP step, timed in turns with the unchanged step."""
    from bench_step import groupsort_lipschitz_layers

    from lipdp.layers import LipschitzConv2D

    original_conv = LipschitzConv2D.convolution_op

    def plain_convolution(self, inputs, kernel):
        return keras.layers.Conv2D.convolution_op(self, inputs, kernel)

    variants = [
        ("lipdp as it is", None, False),
        ("a GroupSort after each convolution (the config's CNN until 2026-11-23)", groupsort_lipschitz_layers, False),
        ("LipschitzConv2D without its empty-batch stand-in (wrong on an empty batch)", None, True),
    ]
    models = []
    for _, layers, plain in variants:
        if plain:
            LipschitzConv2D.convolution_op = plain_convolution
        try:
            model, _ = build(x, y, len(xb), layers() if layers else None)
            model.train_on_batch(xb, yb)  # traced now, with the replacement
        finally:
            LipschitzConv2D.convolution_op = original_conv
        models.append(model)
    times = interleaved_ms([lambda m=m: m.train_on_batch(xb, yb) for m in models], steps)
    return [(label, ms, ms / times[0]) for (label, _, _), ms in zip(variants, times)]


def xla_what_if(x, y, xb, yb, steps):
    """``train_on_batch`` with and without ``jit_compile`` (lipdp refuses it for private steps: measured by
    setting ``model.jit_compile = True`` after ``make_private``; not a supported configuration)."""
    from bench_step import lipschitz_layers, ordinary_layers

    labels, models = [], []
    for label, private in (
        ("ordinary CNN, non-private", None),
        ("Lipschitz CNN, non-private", False),
        ("clipless DP", True),
    ):
        for jit in (False, True):
            if private:
                model, _ = build(x, y, len(xb))
            else:
                keras.utils.set_random_seed(0)
                model = keras.Sequential(ordinary_layers() if private is None else lipschitz_layers())
                loss = (
                    keras.losses.CategoricalCrossentropy(from_logits=True)
                    if private is None
                    else lipdp.losses.TauCategoricalCrossentropy(16.0)
                )
                model.compile(keras.optimizers.Adam(1e-3), loss=loss)
            model.jit_compile = jit
            labels.append(f"{label}, jit_compile={jit}")
            models.append(model)
    times = interleaved_ms([lambda m=m: m.train_on_batch(xb, yb) for m in models], steps)
    return list(zip(labels, times))


def layer_times(model, xb, steps):
    """Forward, and forward + backward (input and weight gradients), of each layer at its input in ``model``."""
    rows = []
    inputs = tf.constant(xb)
    for layer in model.layers:
        variables = layer.trainable_variables

        @tf.function
        def fwd(x, layer=layer):
            return layer(x, training=True)

        @tf.function
        def fwd_bwd(x, layer=layer, variables=variables):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x, training=True)
                total = tf.reduce_sum(out * out)
            return tape.gradient(total, [x] + variables)

        forward_ms = median_ms(lambda f=fwd, x=inputs: sync(f(x)), steps)
        both_ms = median_ms(lambda f=fwd_bwd, x=inputs: sync(f(x)), steps)
        rows.append((f"{layer.name} ({type(layer).__name__})", forward_ms, both_ms))
        inputs = fwd(inputs)
    return rows


def trace(model, xb, yb, log_dir, steps=10):
    """Profiler trace of ``steps`` full steps: host time per step by op type, and by layer and pass.

    Ops under ``gradient_tape/`` are the backward pass, ops under the model's name the forward pass
    of the layer named next; the others (bounds, noise, optimizer, constraints, metrics) are grouped
    by their first scope.
    """
    for _ in range(3):
        model.train_on_batch(xb, yb)
    events = optrace.record(lambda: model.train_on_batch(xb, yb), log_dir, steps)
    by_scope = collections.Counter()
    for op_name, _, ms in events:
        path = op_name.split("/")
        backward = path[0] == "gradient_tape"
        path = path[1:] if backward else path
        if path[0] == model.name and len(path) > 2:
            scope = f"{path[1]} ({'backward' if backward else 'forward'})"
        else:
            scope = f"{'backward: ' if backward else ''}{path[0].rstrip('_0123456789') or path[0]}"
        by_scope[scope] += ms
    return optrace.op_type_times(events), by_scope.most_common(25)


def _header(args, title):
    command = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    load = os.getloadavg()
    others = subprocess.run(["ps", "-eo", "ni,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busy = [line.split() for line in others.splitlines()[1:] if line.split() and float(line.split()[1]) > 20.0]
    return [
        title,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Load average at the end: {load[0]:.2f}; processes above 20 % CPU then (nice, %CPU, name): "
        f"{'; '.join(' '.join(b) for b in busy) or 'none'}.",
    ]


def what_if_report(x, y, args):
    tables = []
    for batch in args.what_if_only:
        rows = what_if(x, y, x[:batch], y[:batch], args.steps)
        tables += ["", f"Batch {batch}, medians of {args.steps} steps of each variant, timed in turns:", ""]
        tables += ["| variant | ms | vs lipdp as it is |", "| --- | --- | --- |"]
        tables += [f"| {name} | {ms:.2f} | {ratio:.2f} |" for name, ms, ratio in rows]
    title = "# What if: variants of the clipless DP step (`configs/mnist_conv.yaml` CNN), not in lipdp"
    text = "\n".join(_header(args, title) + tables) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dataset-size", type=int, default=8000, help="random examples the sampler draws from")
    parser.add_argument("--xla", action="store_true", help="also time the steps compiled with XLA (jit_compile)")
    parser.add_argument("--trace", metavar="DIR", help="also write a TensorFlow profiler trace here")
    parser.add_argument("--out", help="write the breakdown as Markdown here")
    parser.add_argument(
        "--what-if-only",
        type=int,
        nargs="+",
        metavar="BATCH",
        help="only the what-if table (replaced pieces timed in turns), at these batch sizes",
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.random((args.dataset_size, 28, 28, 1), dtype=np.float32)
    y = tf.one_hot(rng.integers(0, 10, args.dataset_size), 10).numpy()
    if args.what_if_only:
        return what_if_report(x, y, args)
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    model, sampler = build(x, y, args.batch_size)
    rows, per_layer = pieces(model, sampler, xb, yb, args.steps)
    from bench_step import ordinary_layers

    keras.utils.set_random_seed(0)
    ordinary = keras.Sequential(ordinary_layers())
    ordinary.compile(keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    baselines = [
        (
            "non-private ordinary CNN of the same shape (`train_on_batch`)",
            median_ms(lambda: ordinary.train_on_batch(xb, yb), args.steps),
        ),
    ]
    whatif_rows = what_if(x, y, xb, yb, args.steps)
    xla_rows = xla_what_if(x, y, xb, yb, args.steps) if args.xla else []
    lipschitz_rows = layer_times(model, xb, args.steps)
    ordinary_rows = layer_times(ordinary, xb, args.steps)
    full = rows[0][1]
    lines = _header(args, f"# Profile of one clipless DP step (`configs/mnist_conv.yaml` CNN, batch {args.batch_size})")
    lines += [
        "",
        f"Medians of {args.steps} calls after 5 warm-up calls, each piece a separate `tf.function`:",
        "",
        "| piece | ms | share of the full step |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {ms:.2f} | {ms / full:.0%} |" for name, ms in rows]
    lines += [f"| {name} | {ms:.2f} | {ms / full:.0%} |" for name, ms in baselines]
    lines += ["", "What if (full clipless DP step, `train_on_batch`, variants not in lipdp; the"]
    lines += ["variants timed in turns, step by step, so that other load hits all of them alike):", ""]
    lines += ["| variant | ms | vs lipdp as it is |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ms:.2f} | {ratio:.2f} |" for name, ms, ratio in whatif_rows]
    if xla_rows:
        lines += [
            "",
            "XLA (`train_on_batch`, timed in turns; lipdp refuses `jit_compile=True` for private steps, forced here):",
            "",
        ]
        lines += ["| model | ms |", "| --- | --- |"] + [f"| {name} | {ms:.2f} |" for name, ms in xla_rows]
    lines += ["", "Per layer, projections and certified norms:", "", "| piece | ms |", "| --- | --- |"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in per_layer]
    for title, table in (("Lipschitz CNN", lipschitz_rows), ("ordinary CNN", ordinary_rows)):
        lines += ["", f"Per layer of the {title} (its input in the network), forward and forward + backward (input and"]
        lines += ["weight gradients of the summed squared output), separate `tf.function`s:", ""]
        lines += ["| layer | forward ms | forward + backward ms |", "| --- | --- | --- |"]
        lines += [f"| {name} | {f:.2f} | {b:.2f} |" for name, f, b in table]
    if args.trace:
        by_type, by_scope = trace(model, xb, yb, args.trace)
        lines += ["", "TensorFlow profiler trace of 10 full steps: op time per step (summed over the compute threads)"]
        lines += ["by layer and pass, other ops by their first name scope (top 25):", ""]
        lines += ["| scope | ms/step |", "| --- | --- |"] + [f"| {op} | {ms:.2f} |" for op, ms in by_scope]
        lines += ["", "By op type (top 15):", "", "| op type | ms/step |", "| --- | --- |"]
        lines += [f"| {op} | {ms:.2f} |" for op, ms in by_type]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
