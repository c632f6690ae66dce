"""The benchmark behind ``steercmp bench``: steercmp's scoring sweep against the usual ways of running a steering grid.

On ONE set of cells (prompt x condition x alpha) it times four implementations of the same score
(family log-mass at the scoring slot, see :mod:`steercmp.score.forms`):

- (a) ``loop``: the usual loop, one full forward (all positions, all logits) per cell with a
  forward hook (:func:`steercmp.lm.hooks.injecting`) adding the delta;
- (b) ``nnsight``: the same cells through nnsight, one ``trace`` per cell, the residual edit
  written inside the trace;
- (c) ``batched``: AxBench-style batching, per-row deltas, a full forward of every row
  (:func:`steercmp.score.full_forward.score_rows`);
- (d) ``steercmp``: :func:`steercmp.score.sweep.score_rows_fast` (prefix KV cache, blocks L+1..N only,
  logits at the scoring slot and branch tokens only).

and the minimal-recomputation bound: the batched pass of blocks L+1..N over the injected
positions with last-position logits only, on the same rows (``bound``), plus the same pass with
the multi-token branch tokens a family score cannot avoid (``bound_with_branches``).

Every path's scores must agree with (d) to ``1e-4`` on every cell it ran; the benchmark fails
(exit 1) otherwise. (a), (b) and optionally (c) run on a deterministic subsample of the cells
(every k-th cell in grid order, k coprime with the conditions x alphas block so every condition
and alpha is covered); their cells/second are measured on that subsample and the JSON says so.

Deltas (no extra model): ``target_edit`` / ``unrelated_edit`` use the ``unembed_direction``
method's math (:func:`steercmp.lm.readout.readout_directions`: unit difference of mean unembedding rows, scaled to 0.25 of
the residual norm at the injection position); ``noop`` is zero; ``random_delta`` is a random
direction with the target delta's norm, seeded per prompt from (seed, prompt id);
``wrong_position`` is the target delta one token earlier. Scaling ``raw``.

Completions: steercmp's batched sampling (:func:`steercmp.score.sample.generate_rows`, one batch
per prompt, per-row deltas and generators) against a per-sample loop (one HF ``generate`` per
sample with the injection hook), both stopping at the first line break.

The package: :mod:`~steercmp.bench.grid` (cells and deltas), :mod:`~steercmp.bench.scoring_paths` (the
compared implementations and the bound), :mod:`~steercmp.bench.completions`, :mod:`~steercmp.bench.suite`
(one run, the table); ``steercmp bench`` (:mod:`steercmp.commands.bench`) is its command.
"""

from steercmp.bench.completions import CompletionBench, completion_bench
from steercmp.bench.grid import ALPHAS, CONDITIONS, FAMILIES, bench_cells, subsample
from steercmp.bench.scoring_paths import bound_times, loop_scores, nnsight_scores
from steercmp.bench.suite import QUICK, TARGETS, TOLERANCE, PathSizes, format_table, run_bench

__all__ = ["ALPHAS", "CONDITIONS", "FAMILIES", "QUICK", "TARGETS", "TOLERANCE", "CompletionBench", "PathSizes",
           "bench_cells", "bound_times", "completion_bench", "format_table", "loop_scores", "nnsight_scores",
           "run_bench", "subsample"]
