"""Mutation check: put plausible bugs into the code one at a time and see which tests catch them.

    nice -n 10 .venv/bin/python benchmarks/mutants.py            # every mutant, one at a time
    .venv/bin/python benchmarks/mutants.py --list                 # names, files, tests
    nice -n 10 .venv/bin/python benchmarks/mutants.py --only fisher-no-divide-by-n -j 2

Each mutant is ``(name, file, exact snippet, replacement, test files)``. The repository is never
touched: each worker copies the working tree's files (``git ls-files`` of tracked and untracked,
not-ignored files, or the tree of ``--ref REV``) into a temporary folder, replaces the snippet
there, runs ``pytest -x`` on the mutant's test files with this repository's ``.venv`` python,
and puts the file back before the next mutant. Kernel builds go to a build folder per worker
(``GRASS_CALLBACK_BUILD_DIR``), a fresh one for mutants of ``csrc/``.

Statuses: ``caught`` (a test failed; the first failing test is named), ``survived`` (every test
passed: the tests let the bug through), ``snippet not found`` / ``snippet ambiguous`` (the code
changed since the mutant was written: update the snippet), ``no tests`` (none of its test files
exists), ``timeout`` (reported apart, not counted as caught: on a loaded machine it is usually
the load), ``baseline fails``. Before the mutants, their test targets run
once on the unmutated copy, all of them (``--no-baseline`` skips it): a mutant whose targets
already fail there is reported as ``baseline fails`` and not run, since "caught" would mean
nothing (in a shared tree, usually another edit in progress). The exit status is the number of
survivors (capped at 100).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str
    origin: str = "fresh"  # "issue": from the table of issue 15


T_REFS = "tests/test_independent_refs.py"
T_DV = T_REFS + "::test_data_value_is_the_sum_of_every_period_scores"
T_RESUME = "tests/test_crash.py::test_resume_keeps_exactly_the_rows_before_the_checkpoint_and_rebuilds_the_period_fisher"
T_KERNEL = "tests/test_ops.py::test_cpu_kernel_matches_reference"
T_FISHER = "tests/test_fisher.py"
T_FACTOR_DTYPE = T_FISHER + "::test_factor_dtype_follows_the_condition_bound"
T_HALF_ROWS = T_FISHER + "::test_float32_factor_for_half_rows_solves_within_a_quarter_of_their_rounding"
T_FALLBACK = T_FISHER + "::test_failed_float32_factor_is_redone_in_float64_at_the_same_ratio"
T_CHOLESKY_RETRY = T_FISHER + "::test_cholesky_failure_warns_and_raises_damping"
T_CKPT = "tests/test_checkpoints.py::test_ensemble_is_the_sum_of_checkpoint_scores"
T_SPREAD = "tests/test_checkpoints.py::test_score_spread_merges_chunks_into_the_population_std"
T_REDONE = T_FISHER + "::test_factor_after_failed_attempts_is_that_of_its_reported_damping"
T_DUAL = "tests/test_dual_fisher.py"
T_DUAL_REF = T_REFS + "::test_a_period_of_fewer_rows_than_half_of_k_is_solved_through_its_kernel_and_matches_the_hand_reference"
T_SUSPECT = "tests/test_data_value.py::test_suspect_weights_the_unit_ranks_of_low_value_and_high_self_influence_0_3_to_0_7"
T_DAMPING = "tests/test_damping.py"
T_HEAD_REF = T_REFS + "::test_auto_damping_gives_a_vocabulary_head_a_tenth_of_the_rule_and_matches_the_hand_reference"
T_LOSS = "tests/test_training_loss.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ the table
    Mutant("dv-replaced", "grass_callback/data_value.py",
           "target[i] = target.get(i, 0.0) + v", "target[i] = v",
           (T_DV,), "data value replaced instead of summed across scoring periods", "issue"),
    Mutant("keep-all-ignored", "grass_callback/callback.py",
           'if self.keep_history == "period":\n            self.period_start = self.batches_seen',
           'if True:\n            self.period_start = self.batches_seen',
           (T_REFS + "::test_keep_history_all_rescores_every_stored_row_each_period",),
           "keep_history='all' ends periods like 'period': earlier rows not rescored", "issue"),
    Mutant("query-train-mode", "grass_callback/attribution.py",
           "    model.eval()\n    ids_all", "    ids_all",
           (T_REFS + "::test_query_gradients_of_a_dropout_model_are_eval_mode_gradients",),
           "query gradients taken with the model left in train mode (dropout active)", "issue"),
    Mutant("token-counts-ignored", "grass_callback/capture.py",
           "scale = counts.sum() / counts.clamp_min(1)", "scale = counts.sum() / counts.clamp_min(1) * 0 + batch_size",
           ("tests/test_capture.py",),
           "padding ignored: token_mean scale without the token counts (the taps' token mask is gone)", "issue"),
    Mutant("no-fsync-before-rename", "grass_callback/_store_format.py",
           "        os.fsync(f.fileno())\n    return h.hexdigest()", "    return h.hexdigest()",
           ("tests/test_faults.py::test_shard_and_manifest_are_fsynced_before_their_rename",),
           "shard not fsynced before its rename", "issue"),
    Mutant("truncate-one-too-many", "grass_callback/callback.py",
           "dropped = self.store.truncate_after(batches - 1)", "dropped = self.store.truncate_after(batches)",
           (T_RESUME,), "truncate_after keeps one step too many on resume", "issue"),
    Mutant("resume-no-fisher-rebuild", "grass_callback/_continuity.py",
           "        cb.fisher.update(chunk.grads)\n", "        pass\n",
           (T_RESUME,), "resume skips the Fisher rebuild from the store", "issue"),
    # ------------------------------------------------------------------ capture
    Mutant("scale-mean-ones", "grass_callback/capture.py",
           "scale = torch.full((batch_size,), float(batch_size),", "scale = torch.full((batch_size,), 1.0,",
           ("tests/test_capture.py",), "mean reduction: per-example scale 1 instead of B (wrong scale)"),
    Mutant("scale-no-accumulation", "grass_callback/capture.py",
           "scale = scale * int(accumulate_grad_batches)", "scale = scale * 1",
           ("tests/test_loop_variants.py::test_accumulate_grad_batches",), "accumulate_grad_batches dropped"),
    Mutant("scale-times-grad-scale", "grass_callback/capture.py",
           "scale = scale / grad_scale.detach()", "scale = scale * grad_scale.detach()",
           ("tests/test_loop_variants.py::test_fp16_mixed_with_a_real_grad_scaler",),
           "fp16 GradScaler scale multiplied instead of divided"),
    Mutant("tied-last-use-wins", "grass_callback/capture.py",
           "self._acc[name] = self._acc[name] + out", "self._acc[name] = out",
           ("tests/test_capture.py",), "a layer used twice keeps only its last use (dropped term)"),
    # ------------------------------------------------------------------ ops
    Mutant("ref-bias-zero", "grass_callback/ops/reference.py",
           "xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)",
           "xs = torch.cat([xs, xs.new_zeros(*xs.shape[:-1], 1)], dim=-1)",
           (T_KERNEL,), "torch reference: bias column of zeros instead of ones"),
    Mutant("ref-scale-dropped", "grass_callback/ops/reference.py",
           "out = out * scale.to(device=out.device, dtype=acc).unsqueeze(1)", "out = out",
           (T_KERNEL,), "torch reference ignores the per-example scale"),
    Mutant("kernel-gemm-first-sjlt-row", "csrc/factgrass_cpu.cpp",
           "  for (int64_t j = 0; j < c; ++j) {\n    const int32_t* bj = bucket + j * k_prime;",
           "  for (int64_t j = 0; j < 1; ++j) {\n    const int32_t* bj = bucket + j * k_prime;",
           (T_KERNEL, "tests/test_kernel_paths.py"),
           "C++ kernel, GEMM path (T >= 64, k' >= 4096, or forced): only the first of c SJLT rows"),
    Mutant("kernel-one-token-first-sjlt-row", "csrc/factgrass_cpu.cpp",
           "      for (int64_t j = 0; j < c; ++j) {  // through a local copy",
           "      for (int64_t j = 0; j < 1; ++j) {  // through a local copy",
           ("tests/test_kernel_paths.py",), "C++ kernel, one-token groups: only the first of c SJLT rows"),
    Mutant("kernel-one-token-lanes-shifted", "csrc/factgrass_cpu.cpp",
           "for (int64_t q = 0; q < k; ++q) ob[q] = og[q * L + l] * s;",
           "for (int64_t q = 0; q < k; ++q) ob[q] = og[q * L + (l + 1) % L] * s;",
           ("tests/test_kernel_paths.py",), "C++ kernel, one-token groups: each example gets its neighbour's lane"),
    # ------------------------------------------------------------------ projection
    Mutant("tables-sign-dropped", "grass_callback/projection.py",
           "weight = self.sign.to(torch.float32) / math.sqrt(self.c)",
           "weight = self.sign.abs().to(torch.float32) / math.sqrt(self.c)",
           ("tests/test_ops.py::test_op_equals_loops_over_tables_built_in_the_test",),
           "the op's SJLT values lose their signs (caught without the exact-autograd test)"),
    Mutant("sjlt-scale-1-over-c", "grass_callback/projection.py",
           "w = (sign.to(torch.float32) / math.sqrt(c)).to(v.dtype)", "w = (sign.to(torch.float32) / c).to(v.dtype)",
           ("tests/test_projection.py",), "SJLT values 1/c instead of 1/sqrt(c) (wrong scale)"),
    Mutant("sjlt-no-block-offsets", "grass_callback/projection.py",
           "bucket = (torch.randint(0, block, (c, n), generator=gen) + offsets).to(torch.int32)",
           "bucket = torch.randint(0, block, (c, n), generator=gen).to(torch.int32)",
           ("tests/test_projection.py",), "SJLT rows all in the first block: targets of a coordinate collide"),
    Mutant("run-mask-no-shift", "grass_callback/projection.py",
           "shift = int(torch.randint(0, n, (1,), generator=gen))", "shift = 0 * int(torch.randint(0, n, (1,), generator=gen))",
           ("tests/test_projection.py",), "run masks without the random rotation (coordinates not uniform)"),
    Mutant("factgrass-side-sqrt-k", "grass_callback/projection.py",
           "d_out: int, *, oversample: float = 4.0,", "d_out: int, *, oversample: float = 1.0,",
           ("tests/test_projection.py",), "default mask budget k' = k instead of 4k (sides sqrt(k), not 2 sqrt(k))"),
    # ------------------------------------------------------------------ fisher
    Mutant("fisher-no-divide-by-n", "grass_callback/fisher.py",
           "    fisher = sums.to(dtype, copy=True).div_(count)\n", "    fisher = sums.to(dtype, copy=True)\n",
           ("tests/test_fisher.py::test_fisher_damping_and_solve_match_dense_reference",),
           "fit uses the sum, not the mean, of g gᵀ (wrong scale)"),
    Mutant("damping-not-per-k", "grass_callback/fisher.py",
           "        lam = ratio * trace / k\n", "        lam = ratio * trace\n",
           ("tests/test_fisher.py::test_fisher_damping_and_solve_match_dense_reference",),
           "damping λ = r·trace instead of r·trace/k"),
    Mutant("quadratic-not-squared", "grass_callback/fisher.py",
           "rows.T, upper=False).square().sum(0)", "rows.T, upper=False).sum(0)",
           ("tests/test_scoring.py",), "self-influence ‖L⁻¹g‖ summed without squaring"),
    # ------------------------------------------------------------------ scoring
    Mutant("opponents-largest", "grass_callback/scoring.py",
           "torch.cat([bottom_scores, scores], 1), topk, largest=False", "torch.cat([bottom_scores, scores], 1), topk, largest=True",
           ("tests/test_scoring.py",), "opponents picked as the highest scores (wrong sign)"),
    Mutant("data-value-mean-over-queries", "grass_callback/scoring.py",
           "values.add(ids, scores.sum(0))", "values.add(ids, scores.mean(0))",
           ("tests/test_scoring.py",), "data value averaged instead of summed over queries"),
    Mutant("merge-drops-last-rank", "grass_callback/scoring.py",
           "    for r in results:\n        values.add(r.data_value_ids, r.data_value)",
           "    for r in results[:-1]:\n        values.add(r.data_value_ids, r.data_value)",
           ("tests/test_scoring.py",), "merging ranks drops the last rank's data values (off by one)"),
    # ------------------------------------------------------------------ store
    Mutant("fetch-earliest-wins", "grass_callback/_store_read.py",
           "better = s >= best_step[p]", "better = s <= best_step[p]",
           ("tests/test_store.py",), "fetch returns an id's earliest row instead of its latest"),
    Mutant("min-step-exclusive", "grass_callback/_store_read.py",
           "m = steps >= min_step", "m = steps > min_step",
           ("tests/test_store.py::test_read_filters", T_DV), "min_step filter drops the period's first batch (off by one)"),
    # ------------------------------------------------------------------ callback
    Mutant("period-start-off-by-one", "grass_callback/callback.py",
           "            self.period_start = self.batches_seen\n            self.fisher.reset()",
           "            self.period_start = self.batches_seen - 1\n            self.fisher.reset()",
           (T_DV,), "a period also rescores the previous period's last batch (off by one)"),
    Mutant("ensemble-not-standardised", "grass_callback/callback.py",
           "self_influence=own, standardise=self.ensemble_standardise, standardised=z)",
           "self_influence=own, standardise=False, standardised=z)",
           (T_REFS + "::test_ensemble_ranks_by_scores_summed_over_periods",),
           "the checkpoint ensemble sums raw scores although standardise=True"),
    Mutant("head-rule-off", "grass_callback/projection.py",
           "if wide_output_skew > 1 and is_vocabulary_head(k, d_in_eff, d_out, oversample):",
           "if False and is_vocabulary_head(k, d_in_eff, d_out, oversample):",
           ("tests/test_projection.py::test_a_vocabulary_head_spends_the_mask_budget_on_its_output",),
           "vocabulary heads get square masks (the wide-output rule skipped)"),
    Mutant("deferred-ids-unchecked", "grass_callback/callback.py",
           "        if self._host_ids is None and not self._admit(trainer):  # the indices landed during the step",
           "        if self._host_ids is None and not (setattr(self, '_host_ids', self._ids.host()) or True):",
           ("tests/test_batch_ids.py",),
           "on a GPU (indices read after backward) the batch's indices are never checked or admitted"),
    # ------------------------------------------------------------------ float32 factors for half rows
    Mutant("factor-dtype-quarter-inverted", "grass_callback/fisher.py",
           "torch.finfo(rows_dtype).eps / 4 else", "torch.finfo(rows_dtype).eps * 4 else",
           (T_FACTOR_DTYPE,), "float32 factors allowed up to 4 x the rows' rounding instead of a quarter of it"),
    Mutant("factor-no-float64-fallback", "grass_callback/fisher.py",
           "for precision in dict.fromkeys((dtype, sums.dtype)):", "for precision in (dtype,):",
           (T_FALLBACK,), "a failed float32 Cholesky raises the ratio instead of being redone in float64"),
    Mutant("fallback-damped-twice", "grass_callback/fisher.py",
           "                matrix = _fisher_in(sums, count, precision, name)\n",
           "                matrix = fisher.to(precision)\n",
           (T_FALLBACK, T_REDONE), "the float64 redo starts from the float32 matrix, already damped: F + 2 lambda I"),
    Mutant("retry-diagonal-not-restored", "grass_callback/fisher.py",
           "                matrix = fisher\n                matrix.diagonal().copy_(diagonal)\n",
           "                matrix = fisher\n",
           (T_CHOLESKY_RETRY, T_REDONE), "each retry adds its lambda onto the last one's (F's diagonal not restored)"),
    Mutant("fisher-in-no-copy", "grass_callback/fisher.py",
           "fisher = sums.to(dtype, copy=True).div_(count)", "fisher = sums.to(dtype).div_(count)",
           (T_HALF_ROWS,), "a fit in the statistics' dtype divides the running sums in place (a second fit is off)"),
    # ------------------------------------------------------------------ checkpoint ensemble
    Mutant("spread-no-delta-term", "grass_callback/checkpoints.py",
           "m2 = m2 + c_m2 + delta.square() * (count * n / total)", "m2 = m2 + c_m2",
           (T_CKPT, T_SPREAD), "chunks' squared deviations merged without the between-chunk term (spread too small)"),
    Mutant("spread-sample-std", "grass_callback/checkpoints.py",
           "return (m2 / count).sqrt()", "return (m2 / (count - 1)).sqrt()",
           (T_CKPT, T_SPREAD), "the spread is the sample std (n - 1), not the population std the docs state"),
    Mutant("spread-last-checkpoint-unscaled", "grass_callback/checkpoints.py",
           "for c, store in enumerate(stores):\n            mine", "for c, store in enumerate(stores[:-1]):\n            mine",
           (T_CKPT,), "the last checkpoint's scores are summed without dividing by their spread"),
    # ------------------------------------------------------------------ weighted suspect
    Mutant("suspect-weights-swapped", "grass_callback/data_value.py",
           "self_influence.to(torch.float64)], [w, 1 - w])", "self_influence.to(torch.float64)], [1 - w, w])",
           (T_SUSPECT,), "suspect = 0.7 x low data value + 0.3 x self-influence (weights swapped)"),
    # ------------------------------------------------------------------ dual solve (rows' kernel)
    Mutant("dual-damping-not-times-n", "grass_callback/dual_fisher.py",
           "damped.diagonal().add_(self.count * self.lam)", "damped.diagonal().add_(self.lam)",
           (T_DUAL, T_DUAL_REF), "the kernel is damped by lambda, not N lambda (the Woodbury form of F = GᵀG/N)"),
    Mutant("dual-rows-kept-after-load", "grass_callback/fisher.py",
           "        self._drop_rows()  # the sums are the saved ones, not the rows this object saw\n", "",
           (T_DUAL,), "statistics loaded from a checkpoint keep solving through the rows seen before the load"),
    Mutant("dual-rows-kept-after-reduce", "grass_callback/fisher.py",
           "        if int(value) != self.count:  # no longer the kept rows' count\n            self._drop_rows()\n", "",
           (T_DUAL,), "sums reduced with other ranks' rows keep solving through this rank's rows alone"),
    Mutant("dual-rows-kept-past-half-k", "grass_callback/fisher.py",
           "                if seen <= max_rows(k):", "                if seen <= k - 1:",
           (T_DUAL,), "rows are kept up to k - 1 (the dual then costs more than the k x k factor, and memory grows)"),
    Mutant("dual-gather-rows-at-offset-0", "grass_callback/fisher.py",
           "total, start = sum(seen), sum(seen[:rank])", "total, start = sum(seen), 0",
           (T_DUAL,), "every rank places its rows at offset 0 of the gathered buffer (ranks' rows summed together)"),
    # ------------------------------------------------------------------ the vocabulary head's damping
    Mutant("head-scale-not-applied", "grass_callback/fisher.py",
           "_auto_ratio(trace, k, self.count) * self._auto_scales.get(name, 1.0) if auto else ratio",
           "_auto_ratio(trace, k, self.count) if auto else ratio",
           (T_DAMPING, T_HEAD_REF), "FisherStats.fit(\"auto\") ignores the layers' auto_scales"),
    Mutant("head-scale-on-a-fixed-ratio", "grass_callback/fisher.py",
           "_auto_ratio(trace, k, self.count) * self._auto_scales.get(name, 1.0) if auto else ratio",
           "(_auto_ratio(trace, k, self.count) if auto else ratio) * self._auto_scales.get(name, 1.0)",
           (T_DAMPING,), "a damping ratio the user gives is scaled on vocabulary heads too"),
    Mutant("head-class-ignores-narrow-input", "grass_callback/projection.py",
           "return d_out >= WIDE_OUTPUT_RATIO * d_in_eff and d_in_eff >= _side(k, float(oversample))",
           "return d_out >= WIDE_OUTPUT_RATIO * d_in_eff",
           (T_DAMPING,), "an MLP's narrow input layer (24 -> 512) counts as a vocabulary head"),
    # ------------------------------------------------------------------ the per-example training loss
    Mutant("loss-window-ignored", "grass_callback/callback.py",
           "end = self.batches_seen if window is None else min(self.batches_seen, window)",
           "end = self.batches_seen", (T_LOSS,), "training_loss sums every step's losses, not the first half's"),
    Mutant("loss-not-in-suspect", "grass_callback/data_value.py",
           'if self.sums["training_loss"]:\n            score = suspect_with_loss',
           'if False:\n            score = suspect_with_loss', (T_LOSS,), "suspect leaves the training loss out"),
    Mutant("replayed-batch-loses-its-losses", "grass_callback/callback.py",
           "loss = None if loss is None else loss[keep.to(loss.device)]", "loss = None",
           (T_LOSS + "::test_a_resume_that_replays_part_of_an_epoch_keeps_each_stored_row_with_its_own_loss",),
           "a batch with replayed rows stores no losses"),
    Mutant("loss-dropped-by-truncation", "grass_callback/store.py",
           'data["loss"][keep] if "loss" in data else None)', "None)",
           (T_LOSS,), "a resume's truncation loses the losses of the shard it cuts"),
    Mutant("old-loss-sums-unsaid", "grass_callback/callback.py",
           'missing = "training_loss_ids" not in state_dict["data_values"]', "missing = False",
           (T_LOSS + "::test_a_checkpoint_without_loss_sums_warns_and_counts_the_steps_after_the_resume",),
           "a checkpoint without loss sums gives a short training_loss without a word"),
    # ------------------------------------------------------------------ one callback object, two fits
    Mutant("second-fit-keeps-the-first", "grass_callback/callback.py",
           'if stage == "fit" and self.__dict__.get("_fit_ended"):', "if False:",
           ("tests/test_resume_cases.py::test_a_second_fit_with_the_same_callback_taps_the_new_module",),
           "a second fit keeps the first fit's taps and closed store"),
    # ------------------------------------------------------------------ one-token layers
    Mutant("one-token-plan-ignored", "grass_callback/capture.py",
           "plan = plan.input_plan(token_axis=x.dim() > 2)", "plan = plan",
           ("tests/test_capture.py::test_one_token_layers_keep_their_whole_gradient_with_two_nonzeros_and_token_layers_the_masks",),
           "layers without a token axis are compressed with the masks"),
    Mutant("one-token-sizes-not-saved", "grass_callback/projection.py",
           'out["one_token"] = dict(self._one_token)', "pass",
           ("tests/test_projection.py::test_one_token_plan_survives_a_save_and_plans_saved_before_it_keep_their_masks",),
           "a store's plans forget their one-token sizes, so its readers compress queries with the masks"),
    Mutant("blocked-cholesky-skips-the-update", "grass_callback/_linalg.py",
           "trailing.addmm_(panel, panel.T, alpha=-1.0)", "pass",
           ("tests/test_linalg.py::test_blocked_factor_equals_lapack",
            "tests/test_fisher.py::test_layers_wider_than_a_factor_block_solve_as_the_dense_inverse"),
           "the CPU Cholesky of a layer wider than a block leaves the trailing matrix un-updated"),
    Mutant("self-influence-solves-the-wrong-triangle", "grass_callback/fisher.py",
           "torch.linalg.solve_triangular(lower, rows.T, upper=False)",
           "torch.linalg.solve_triangular(lower, rows.T, upper=True)",
           ("tests/test_fisher.py::test_layers_wider_than_a_factor_block_solve_as_the_dense_inverse",
            "tests/test_fisher.py::test_float32_factor_for_half_rows_solves_within_a_quarter_of_their_rounding",
            "tests/test_period_cost.py::test_self_influence_of_half_precision_rows_matches_a_float64_reference"),
           "self-influence solves the rows against the factor's zero upper triangle (its diagonal only)"),
]


# ---------------------------------------------------------------------- workspace


def _source_files(ref: str | None) -> list[str]:
    if ref is not None:
        out = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "-z", "--name-only", ref],
                             check=True, capture_output=True).stdout
    else:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def make_workspace(root: Path, ref: str | None) -> Path:
    """A copy of the repository's files under ``root/tree`` (never the repository itself)."""
    tree = root / "tree"
    shutil.rmtree(tree, ignore_errors=True)  # a previous run's copy; its build folder is kept
    if ref is not None:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref],
                                 check=True, capture_output=True).stdout
        tree.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        return tree
    for rel in _source_files(None):
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree
            continue
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    return tree


def _env(root: Path, build_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GRASS_CRASH"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONDONTWRITEBYTECODE="1",
               GRASS_CALLBACK_BUILD_DIR=str(build_dir), PYTHONPATH=str(root / "tree"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(root / "wandb" / var.lower())
    return env


def run_tests(root: Path, tests: list[str], build_dir: Path, timeout: float,
              first_failure: bool = True) -> tuple[str, list[str]]:
    """``(status, failed test ids or a note)`` of ``pytest`` on ``tests`` inside the workspace;
    ``first_failure`` stops at the first failing test (``-x``)."""
    tree = root / "tree"
    present = [t for t in tests if (tree / t.split("::")[0]).exists()]
    if not present:
        return "no tests", [f"none of {tests} exists"]
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
           "--no-header", "-W", "ignore", *(["-x"] if first_failure else []), *present]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=_env(root, build_dir), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [f"over {timeout:.0f} s"]
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", []
    if proc.returncode == 5:
        return "no tests", ["pytest collected nothing"]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    return "failed", failed or [output.strip().splitlines()[-1][:120]]


def _covers(target: str, test_id: str) -> bool:
    """Whether a failing test id belongs to a test target (a file or a test, maybe parametrized)."""
    return test_id == target or test_id.startswith(target + "::") or test_id.startswith(target + "[")


# ---------------------------------------------------------------------- one mutant


def apply_mutant(tree: Path, mutant: Mutant) -> tuple[str | None, str | None]:
    """Write the mutated file; returns ``(error status, original text)``."""
    path = tree / mutant.file
    if not path.exists():
        return "snippet not found", None
    text = path.read_text()
    count = text.count(mutant.original)
    if count == 0:
        return "snippet not found", None
    if count > 1:
        return "snippet ambiguous", None
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return None, text


def run_mutant(root: Path, mutant: Mutant, timeout: float) -> tuple[str, str, float]:
    tree = root / "tree"
    path = tree / mutant.file
    started = time.perf_counter()
    stat = path.stat() if path.exists() else None
    error, original = apply_mutant(tree, mutant)
    if error is not None:
        return error, "", 0.0
    kernel = mutant.file.startswith("csrc/")
    build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=root)) if kernel else root / "build"
    try:
        status, failed = run_tests(root, list(mutant.tests), build_dir, timeout)
        detail = failed[0] if failed else ""
    finally:
        path.write_text(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the shared kernel build stays valid
        if kernel:
            shutil.rmtree(build_dir, ignore_errors=True)
    verdict = {"failed": "caught", "passed": "survived", "timeout": "timeout"}.get(status, status)
    return verdict, detail, time.perf_counter() - started


# ---------------------------------------------------------------------- driver


def _print_table(rows: list[tuple[Mutant, str, str, float]]) -> None:
    width = max(len(m.name) for m, *_ in rows)
    print(f"\n{'mutant':<{width}}  {'origin':<6}  {'file':<32}  {'status':<17}  {'s':>5}  caught by / detail")
    for m, status, detail, seconds in rows:
        print(f"{m.name:<{width}}  {m.origin:<6}  {m.file:<32}  {status:<17}  {seconds:5.0f}  {detail}")
    for origin in ("issue", "fresh"):
        mine = [(m, s) for m, s, *_ in rows if m.origin == origin]
        if not mine:
            continue
        survivors = [m.name for m, s in mine if s == "survived"]
        caught = sum(1 for _, s in mine if s == "caught")
        timeouts = [m.name for m, s in mine if s == "timeout"]
        not_run = [m.name for m, s in mine if s.startswith(("snippet", "baseline")) or s == "no tests"]
        print(f"{origin}: {len(mine)} mutants, {caught} caught, {len(survivors)} survived"
              + (f" ({', '.join(survivors)})" if survivors else "")
              + (f"; timed out: {', '.join(timeouts)}" if timeouts else "")
              + (f"; not run: {', '.join(not_run)}" if not_run else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", action="append", default=[], help="run only these mutants (repeat or comma-separate)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="workers, each with its own copy (default 1)")
    parser.add_argument("--ref", default=None, help="copy this git revision's tree instead of the working tree")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test files")
    parser.add_argument("--workdir", default=None,
                        help="keep the copies here between runs (same paths: the kernel is built once per "
                             "worker, not once per run); default: a temporary folder removed at the end")
    args = parser.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        names = {n for item in args.only for n in item.split(",") if n}
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants {sorted(unknown)}; see --list")
        chosen = [m for m in MUTANTS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:<30} {m.origin:<6} {m.file:<32} {', '.join(m.tests)}\n    {m.what}")
        return 0
    jobs = max(1, min(args.jobs, len(chosen)))
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="grass-mutants-"))
        else:
            tmp = args.workdir
        roots = [Path(tmp) / f"w{i}" for i in range(jobs)]
        for root in roots:
            make_workspace(root, args.ref)
        broken: set[str] = set()  # targets whose unmutated run fails: their mutants prove nothing
        if not args.no_baseline:
            targets = sorted({t for m in chosen for t in m.tests})
            t0 = time.perf_counter()
            status, failed = run_tests(roots[0], targets, roots[0] / "build", args.timeout * 3,
                                       first_failure=False)
            broken = {t for t in targets for f in failed if _covers(t, f)} if status == "failed" else set()
            print(f"baseline ({len(targets)} test targets, unmutated): {status} in "
                  f"{time.perf_counter() - t0:.0f} s" + (f"; failing: {failed}" if failed else ""), flush=True)
            if status == "timeout":
                print("the unmutated tests did not finish: raise --timeout or pick fewer mutants.")
                return 100
        skipped = [m for m in chosen if set(m.tests) & broken]
        chosen_run = [m for m in chosen if m not in skipped]
        free = list(roots)
        results: dict[str, tuple[str, str, float]] = {}
        with futures.ThreadPoolExecutor(jobs) as pool:
            pending = {}
            queue = list(chosen_run)
            while queue or pending:
                while queue and free:
                    m = queue.pop(0)
                    root = free.pop()
                    pending[pool.submit(run_mutant, root, m, args.timeout)] = (m, root)
                done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for fut in done:
                    m, root = pending.pop(fut)
                    free.append(root)
                    results[m.name] = fut.result()
                    print(f"  {m.name}: {results[m.name][0]} {results[m.name][1]}", flush=True)
        for m in skipped:
            results[m.name] = ("baseline fails", ", ".join(sorted(set(m.tests) & broken)), 0.0)
    rows = [(m, *results[m.name]) for m in chosen]
    _print_table(rows)
    return min(100, sum(1 for _, s, *_ in rows if s == "survived"))


if __name__ == "__main__":
    sys.exit(main())
