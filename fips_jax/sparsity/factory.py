"""`create_updater`: build a sparsity updater from plain config values.

Every argument is data (strings, numbers), so a run's sparsity settings can be printed, saved
next to its checkpoint and diffed. Arguments that an algorithm does not use are ignored, so one
config dict can drive every algorithm.
"""

from __future__ import annotations

from fips_jax.sparsity import masks as mk
from fips_jax.sparsity import updaters

ALGORITHMS = ("dense", "static", "gmp", "rigl", "nm")
# SPEC §5: the paper targets 75% sparsity in every V.
DEFAULT_SPARSITY = 0.75


def create_updater(
    algorithm: str,
    sparsity: float | None = None,
    *,
    t_end: int | None = None,
    update_freq: int = 50,
    filter_regex: str = mk.DEFAULT_FILTER,
    scope: str = "global",
    drop_fraction: float = 0.1,
    init_sparsity: float | None = None,
    begin_step: float | None = None,
    n: int = 2,
    m: int = 4,
    axis: int = -1,
    nm_gradual: bool = False,
    reference_parity: bool = False,
) -> updaters.SparsityUpdater:
    """A sparsity updater by name. (Long for its flat signature and Args: every knob of every
    algorithm is one plain config value, documented here; the body is one dispatch.)

    Args:
      algorithm: one of ALGORITHMS.
      sparsity: target fraction of zeros in the sparse leaves, in [0, 1). None: 0.75 for
        static/gmp/rigl, 0 for dense, 1 - n/m for nm (a different value is an error for nm and
        dense, since the rank formula must use the sparsity actually realised).
      t_end: GMP: number of training steps (the target is in place from the last update step
        before t_end on); RigL: step at which the drop fraction has decayed to 0; nm with
        `nm_gradual`: like GMP. Required by gmp and rigl.
      update_freq: masks change only on steps that are multiples of it (SPEC: 50).
      filter_regex: re.search over slash-joined param paths choosing the sparse leaves.
      scope: "global" (one magnitude top-k over all sparse leaves) or "per_tensor".
      drop_fraction: RigL's initial drop fraction (cosine-decayed to 0 at t_end).
      init_sparsity, begin_step: GMP ramp start (None: the paper's 25% -> 50% -> 75% shape).
      n, m, axis: N:M pattern and the axis its tiles run along.
      nm_gradual: nm only: ramp the tiles from dense-ish to n:m over t_end like GMP instead of
        applying n:m at init.
      reference_parity: GMP: the authors' scheduler bug (ends below target); RigL: do not reset
        the optimiser moments of grown weights (as the authors' code).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown sparsity algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}"
        )
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    common = dict(filter_regex=filter_regex, scope=scope, update_freq=update_freq)

    if algorithm == "dense":
        if sparsity:
            raise ValueError(f"dense takes sparsity 0 (or None), got {sparsity}")
        return updaters.Dense(**common)
    if algorithm == "nm":
        if not 0 < n <= m:
            raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
        if sparsity is not None and abs(sparsity - (1.0 - n / m)) > 1e-9:
            raise ValueError(f"nm {n}:{m} realises sparsity {1.0 - n / m}, got sparsity {sparsity}")
        if nm_gradual and t_end is None:
            raise ValueError("nm_gradual needs t_end")
        return updaters.NM(n=n, m=m, axis=axis, t_end=t_end if nm_gradual else 0, **common)

    sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
    if algorithm == "static":
        return updaters.Static(sparsity=sparsity, **common)
    if t_end is None:
        raise ValueError(f"{algorithm} needs t_end (the number of training steps)")
    if algorithm == "gmp":
        return updaters.GMP(
            sparsity=sparsity,
            t_end=t_end,
            init_sparsity=init_sparsity,
            begin_step=begin_step,
            reference_parity=reference_parity,
            **common,
        )
    return updaters.RigL(
        sparsity=sparsity,
        t_end=t_end,
        drop_fraction=drop_fraction,
        reference_parity=reference_parity,
        **common,
    )

