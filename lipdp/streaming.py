"""Large arrays, memory-mapped feature caches above all, read a block of rows at a time.

A front-end's cached features (:func:`lipdp.layers.cached_features`) are
opened with ``np.load(..., mmap_mode="r")``: nothing is read until used, and
the training split of a carve is a view. Every page of a mapping that is read
stays mapped into the process, and counted in its resident memory, until it
is unmapped; a pass over a 2.8 GB cache would end up holding all of it. The
helpers here read such an array a block at a time and hand each block's pages
back to the page cache once the block is used (the file stays cached by the
kernel, so reading it again costs no disk access), so a pass holds one block
and a gathered batch is one copy. On arrays in memory they are plain slicing
and indexing.
"""

import mmap

import numpy as np

#: About how many bytes of an array one block holds.
BLOCK_BYTES = 64 * 2**20

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # not on Windows: there the pages stay mapped


def block_rows(x):
    """The rows of ``x`` in one block of about :data:`BLOCK_BYTES` (at least one)."""
    row_bytes = x.dtype.itemsize * int(np.prod(x.shape[1:], dtype=np.int64))
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


def row_blocks(x, rows=None):
    """Consecutive blocks of ``rows`` rows of ``x`` (views), a mapped file's pages given back after each block."""
    rows = block_rows(x) if rows is None else int(rows)
    for start in range(0, len(x), rows):
        yield x[start : start + rows]
        release_pages(x)


def take_rows(x, indices):
    """``x[indices]`` in memory: one copy, read a block of rows at a time from a memory-mapped ``x``."""
    indices = np.asarray(indices)
    if read_only_mapping(x) is None:
        return x[indices]
    out = np.empty((len(indices),) + x.shape[1:], x.dtype)
    rows = block_rows(x)
    for start in range(0, len(indices), rows):
        out[start : start + rows] = x[indices[start : start + rows]]
        release_pages(x)
    return out


def read_only_mapping(x):
    """The ``mmap.mmap`` under ``x`` (an ``np.memmap`` or a view of one) if mapped from a file without
    copy-on-write, else ``None`` (in memory; or ``mode="c"``, whose private changes must stay mapped)."""
    mode = None
    while isinstance(x, np.ndarray):
        if mode is None and isinstance(x, np.memmap):
            mode = x.mode
        x = x.base
    if isinstance(x, mmap.mmap) and mode not in (None, "c"):
        return x
    return None


def release_pages(x):
    """Unmaps the pages of ``x``'s file mapping from the process (they stay in the page cache); else nothing.

    The mapping and its data are unchanged: the next read maps the pages again.
    """
    mapping = read_only_mapping(x)
    if mapping is not None and _DONTNEED is not None:
        mapping.madvise(_DONTNEED)
