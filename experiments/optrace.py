"""TensorFlow profiler traces of a few steps, read back as op times (shared by the benchmarks).

``op_type_times(record(lambda: model.train_on_batch(x, y), "/tmp/trace"))`` lists the op types
that took the most time per step.
"""

import collections
import glob
import os


def record(step, log_dir, steps=10):
    """Runs ``step`` ``steps`` times under the profiler: ``[(op name, op type, ms per step)]`` of the compute threads.

    Op events are named ``scope/.../name:OpType``; executor scopes (``::``) are left out. Times are
    summed over the compute threads, so their total can exceed the wall time of a step.
    """
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    tf.profiler.experimental.start(log_dir)
    for _ in range(steps):
        step()
    tf.profiler.experimental.stop()
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as handle:
        space.ParseFromString(handle.read())
    events = []
    for plane in space.planes:
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" in name and "::" not in name:
                    op_name, op_type = name.rsplit(":", 1)
                    events.append((op_name, op_type, event.duration_ps / 1e9 / steps))
    return events


def op_type_times(events, top=15):
    """``[(op type, ms per step)]``, the ``top`` largest."""
    by_type = collections.Counter()
    for _, op_type, ms in events:
        by_type[op_type] += ms
    return by_type.most_common(top)
