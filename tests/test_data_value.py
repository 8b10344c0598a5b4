"""grass_callback.data_value: the signals against hand references, the callback's values against the
offline definitions on a tiny run (hand-scored periods), and equality after a resume.

References are written here with loops / scipy, not with the module's vectorised code: population
standard deviations by ``statistics.pstdev``, ranks by ``scipy.stats.rankdata`` (ties averaged).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.stats import rankdata

from grass_callback import data_value as dv
from grass_callback.data_value import DataValueError, DataValueSums

from test_callback import N_TRAIN as CB_N_TRAIN
from test_callback import fit as cb_fit
from test_independent_refs import N_TRAIN, NUM_QUERIES, RATIO, _fit, _per_epoch, _queries, hand_scores, store_rows


def _random_periods(P=3, m=5, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    # periods on very different scales, as the callback's are (gradients shrink during training)
    return [torch.randn(m, n, generator=g, dtype=torch.float64) * 10.0 ** (2 - p) for p in range(P)]


def _hand_standardise(S, seen):
    m, n = S.shape
    out = torch.zeros(m, n, dtype=torch.float64)
    cols = [j for j in range(n) if seen[j]]
    for q in range(m):
        sigma = statistics.pstdev([float(S[q, j]) for j in cols])
        for j in cols:
            out[q, j] = float(S[q, j]) / sigma if sigma > 0 else 0.0
    return out


def _hand_centred_ranks(S, seen):
    out = torch.zeros(S.shape, dtype=torch.float64)
    cols = [j for j in range(S.shape[1]) if seen[j]]
    for q in range(S.shape[0]):
        r = rankdata([float(S[q, j]) for j in cols])  # average ranks for ties
        for j, rank in zip(cols, r):
            out[q, j] = (rank - 1) / (len(cols) - 1) - 0.5
    return out


# ---------------------------------------------------------------------- one period


def test_standardise_divides_each_query_by_its_spread_over_the_seen_columns():
    S = _random_periods(1, m=4, n=8)[0]
    S[2] = 3.0  # a query with no spread adds nothing
    seen = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    got = dv.standardise(S, seen)
    torch.testing.assert_close(got, _hand_standardise(S, seen), rtol=1e-12, atol=1e-12)
    assert got[2].abs().max() == 0 and got[:, ~seen].abs().max() == 0
    # scale-free: a query multiplied by 1000 standardises to the same row
    S2 = S.clone()
    S2[0] *= 1000
    torch.testing.assert_close(dv.standardise(S2, seen), got)


def test_centred_ranks_match_scipy_rankdata_with_ties():
    g = torch.Generator().manual_seed(1)
    S = torch.randint(0, 4, (5, 10), generator=g).double()  # many ties
    seen = torch.ones(10, dtype=torch.bool)
    seen[[3, 7]] = False
    torch.testing.assert_close(dv.centred_ranks(S, seen), _hand_centred_ranks(S, seen), rtol=0, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataValueError, match="Tensor\\[m, n\\]"):
        dv.standardise(torch.zeros(3))
    with pytest.raises(DataValueError, match="NaN or inf"):
        dv.standardise(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(DataValueError, match="seen must be"):
        dv.centred_ranks(torch.zeros(2, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(DataValueError, match="weights"):
        dv.plain_sum(_random_periods(2), weights=[1.0])
    with pytest.raises(DataValueError, match="start"):
        dv.standardised_sum(_random_periods(2), start=2)
    with pytest.raises(DataValueError, match="one shape"):
        dv.rank_combine([torch.zeros(3), torch.zeros(4)])


# ---------------------------------------------------------------------- over periods


def test_sums_over_periods_with_weights_and_a_start_match_loops():
    periods = _random_periods(4, m=3, n=7, seed=2)
    w = [0.5, 2.0, 1.5, 0.25]
    seen = torch.ones(7, dtype=torch.bool)
    want_plain = torch.zeros(7, dtype=torch.float64)
    want_std = torch.zeros(7, dtype=torch.float64)
    want_rank = torch.zeros(7, dtype=torch.float64)
    for p in range(1, 4):
        for q in range(3):
            for i in range(7):
                want_plain[i] += w[p] * float(periods[p][q, i])
        want_std += w[p] * _hand_standardise(periods[p], seen).sum(0)
        want_rank += w[p] * _hand_centred_ranks(periods[p], seen).mean(0)
    want_rank /= sum(w[1:])
    torch.testing.assert_close(dv.plain_sum(periods, w, start=1), want_plain)
    torch.testing.assert_close(dv.standardised_sum(torch.stack(periods), w, start=1), want_std)
    torch.testing.assert_close(dv.rank_mean(periods, w, start=1), want_rank)
    # the plain sum is dominated by the large-scale first periods; the standardised one is not
    assert not torch.allclose(dv.plain_sum(periods).argsort(), dv.standardised_sum(periods).argsort())


def _hand_suspect(value, own, w=0.3):
    """``w`` x unit rank of ``-value`` + ``(1 - w)`` x unit rank of ``own`` (ranks by scipy, ties averaged)."""
    n = value.numel()
    low = torch.tensor((rankdata(-value.double().numpy()) - 1) / (n - 1), dtype=torch.float64)
    high = torch.tensor((rankdata(own.double().numpy()) - 1) / (n - 1), dtype=torch.float64)
    return w * low + (1 - w) * high


def test_suspect_weights_the_unit_ranks_of_low_value_and_high_self_influence_0_3_to_0_7():
    value = torch.tensor([3.0, -1.0, 0.5, -2.0, 0.5])
    own = torch.tensor([1.0, 9.0, 4.0, 2.0, 7.0])
    # written out: unit ranks of -value (ties 0.5, 0.5 share 1.5 / 4) and of own
    low = torch.tensor([0.0, 3.0, 1.5, 4.0, 1.5], dtype=torch.float64) / 4
    high = torch.tensor([0.0, 4.0, 2.0, 1.0, 3.0], dtype=torch.float64) / 4
    got = dv.suspect(value, own)
    torch.testing.assert_close(got, 0.3 * low + 0.7 * high)
    torch.testing.assert_close(got, _hand_suspect(value, own))
    assert dv.SUSPECT_VALUE_WEIGHT == 0.3
    torch.testing.assert_close(dv.suspect(value, own, 0.5), (low + high) / 2)  # the equal-weight one (before)
    torch.testing.assert_close(dv.suspect(value, own, 1.0), low)
    assert int(got.argmax()) == 1  # low value and the highest self-influence
    # the weight matters: example 3 (lowest value, low self-influence) against example 4 (the reverse)
    assert got[4] > got[3] and dv.suspect(value, own, 0.8)[3] > dv.suspect(value, own, 0.8)[4]
    g = torch.Generator().manual_seed(7)
    v, o = torch.randn(50, generator=g, dtype=torch.float64), torch.rand(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dv.suspect(v, o), _hand_suspect(v, o))
    vals = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3)]
    want = sum(a * torch.tensor((rankdata(x.numpy()) - 1) / 49) for a, x in zip([1.0, 2.0, 5.0], vals)) / 8
    torch.testing.assert_close(dv.weighted_rank_combine(vals, [1.0, 2.0, 5.0]), want.double())
    torch.testing.assert_close(dv.weighted_rank_combine(vals, [1, 1, 1]), dv.rank_combine(vals))


def test_suspect_weights_are_checked():
    v = torch.randn(5)
    with pytest.raises(DataValueError, match="value_weight must be in \\[0, 1\\]"):
        dv.suspect(v, v, 1.5)
    with pytest.raises(DataValueError, match="one weight per signal"):
        dv.weighted_rank_combine([v, v], [1.0])
    with pytest.raises(DataValueError, match="positive sum"):
        dv.weighted_rank_combine([v, v], [0.0, 0.0])
    with pytest.raises(DataValueError, match="positive sum"):
        dv.weighted_rank_combine([v, v], [-1.0, 2.0])


def test_running_sums_equal_the_offline_definitions_and_survive_a_state_round_trip():
    periods = _random_periods(3, m=4, n=6, seed=3)
    seens = [torch.ones(6, dtype=torch.bool), torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool),
             torch.ones(6, dtype=torch.bool)]
    w = [1.0, 0.5, 2.0]
    g = torch.Generator().manual_seed(4)
    own = [torch.rand(6, generator=g, dtype=torch.float64) for _ in periods]
    sums = DataValueSums()
    for S, seen, wp, si in zip(periods, seens, w, own):
        ids = torch.nonzero(seen).squeeze(1)
        sums.add_period(ids, (S * seen).sum(0)[ids], wp, matrix=S, seen=seen, self_influence=(ids, si[ids]))
    masked = [S * seen for S, seen in zip(periods, seens)]
    ids, values = sums.tensors("standardised")
    got = torch.zeros(6, dtype=torch.float64).index_put_((ids,), values)
    want = sum(wp * _hand_standardise(S, seen).sum(0) for S, seen, wp in zip(periods, seens, w))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, dv.standardised_sum(periods, w, seen=seens))
    ids, values = sums.tensors("plain")
    torch.testing.assert_close(torch.zeros(6, dtype=torch.float64).index_put_((ids,), values),
                               dv.plain_sum(masked, w))
    # self-influence: id 3 was not stored in period 1, so it sums two periods
    want_own = sum(wp * si * seen for wp, si, seen in zip(w, own, seens))
    assert sums.sums["self_influence"] == pytest.approx(dict(enumerate(want_own.tolist())))
    ids, value = sums.suspects()
    torch.testing.assert_close(torch.zeros(6, dtype=torch.float64).index_put_((ids,), value), _hand_suspect(got, want_own))
    again = DataValueSums()
    again.load_state_dict(sums.state_dict())
    assert again.sums == sums.sums and again.periods == 3 and again.complete
    # a period without its matrix: the value falls back to the plain sum
    sums.add_period(torch.arange(6), torch.ones(6, dtype=torch.float64))
    assert not sums.complete and sums.value is sums.sums["plain"]


# ---------------------------------------------------------------------- through the callback


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cb, weights = _fit(tmp_path_factory.mktemp("dv"), epochs=3)
    rows = store_rows(Path(cb.store_dir) / "train")
    periods, own = [], []
    for epoch, module in enumerate(weights.modules):
        part = _per_epoch(rows, epoch)
        scores, self_inf = hand_scores(part, _queries(module, cb.taps.plans), RATIO)
        dense = torch.zeros(NUM_QUERIES, N_TRAIN, dtype=torch.float64)
        dense[:, part["ids"]] = scores
        periods.append(dense)
        own.append(torch.zeros(N_TRAIN, dtype=torch.float64).index_add_(0, part["ids"], self_inf))
    return cb, periods, own


def _dense(pair, n):
    ids, values = pair
    assert sorted(ids.tolist()) == list(range(n))
    return torch.zeros(n, dtype=torch.float64).index_put_((ids,), values.double())


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_callback_data_value_is_the_standardised_sum_of_the_hand_scored_periods(run):
    cb, periods, own = run
    seen = torch.ones(N_TRAIN, dtype=torch.bool)
    want = sum(_hand_standardise(S, seen).sum(0) for S in periods)
    _close(torch.tensor([cb.data_value[i] for i in range(N_TRAIN)], dtype=torch.float64), want)
    _close(_dense(cb.data_value_tensors(), N_TRAIN), want)
    _close(_dense(cb.data_value_plain, N_TRAIN), sum(S.sum(0) for S in periods))
    _close(_dense(cb.self_influence, N_TRAIN), sum(own))
    # the suspect ranking: low data value and high self-influence, as defined offline
    ids, suspect = cb.suspect
    _close(_dense((ids, suspect), N_TRAIN), _hand_suspect(want, sum(own)))
    assert suspect[:-1].ge(suspect[1:]).all()  # most suspect first
    table = cb.data_value_tensors().suspects
    assert torch.equal(table[0], ids)
    _close(table[3], sum(own)[ids])


def test_resumed_run_gives_the_same_data_values(tmp_path):
    _, _, full = cb_fit(tmp_path / "a", epochs=2)
    ck = ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True, every_n_epochs=1)
    _, _, first = cb_fit(tmp_path / "b", epochs=1, extra_callbacks=[ck])
    saved = first.state_dict()["data_values"]
    assert saved["periods"] == 1 and saved["standardised"].numel() == CB_N_TRAIN
    _, _, resumed = cb_fit(tmp_path / "b", epochs=2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for name in ("data_value_plain", "self_influence", "suspect"):
        a, b = getattr(full, name), getattr(resumed, name)
        _close(_dense(b, CB_N_TRAIN), _dense(a, CB_N_TRAIN))
    a, b = full.data_value_tensors(), resumed.data_value_tensors()
    _close(_dense(b, CB_N_TRAIN), _dense(a, CB_N_TRAIN))
    # two periods differ from the first alone (so the test tells a sum lost at the resume apart)
    assert not torch.allclose(_dense(b, CB_N_TRAIN), _dense(first.data_value_tensors(), CB_N_TRAIN), rtol=0.1)


def test_a_checkpoint_from_before_the_standardised_value_keeps_the_plain_sum(tmp_path):
    from test_bad_inputs import callback

    cb = callback(tmp_path)
    cb.load_state_dict({"version": 1, "config": dict(cb.config), "data_value_ids": torch.tensor([0, 1]),
                        "data_value": torch.tensor([2.0, -1.0], dtype=torch.float64)})
    assert cb.data_value == {0: 2.0, 1: -1.0}
    assert cb.state_dict()["data_values"]["complete"] is False


def test_the_last_period_folder_holds_the_suspect_table_of_the_callback(run):
    cb, _, _ = run
    lines = [ln for ln in (Path(cb.last_report_folder) / "suspects.csv").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == "train_id,suspect,data_value,self_influence" and len(lines) == 1 + N_TRAIN
    rows = [[float(x) for x in ln.split(",")] for ln in lines[1:]]
    ids, suspect = cb.suspect
    assert [int(r[0]) for r in rows] == ids.tolist()
    torch.testing.assert_close(torch.tensor([r[1] for r in rows], dtype=torch.float64), suspect)
    torch.testing.assert_close(torch.tensor([r[2] for r in rows], dtype=torch.float64),
                               torch.tensor([cb.data_value[i] for i in ids.tolist()], dtype=torch.float64))


def test_the_reporter_logs_the_suspect_table_to_the_run_and_rejects_a_ragged_one(tmp_path):
    from test_report import RecordingRun, make_result

    from grass_callback.data_value import ValueTable
    from grass_callback.report import InfluenceReporter, RunHandle

    run = RecordingRun()
    reporter = InfluenceReporter(tmp_path, RunHandle(run, owned=False), max_rows=2)
    table = (torch.tensor([4, 0, 5]), torch.tensor([0.9, 0.7, 0.2], dtype=torch.float64),
             torch.tensor([-3.0, -0.25, -1.5], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    value = ValueTable(torch.tensor([1, 0, 4]), torch.tensor([1.0, -0.25, -3.0], dtype=torch.float64), table)
    reporter.report(make_result(), step=3, period="epoch-0", data_value=value)
    (payload, step), = run.logged
    logged = payload["grass/suspects"]
    assert step == 3 and logged.columns == ["train_id", "train_example", "suspect", "data_value", "self_influence"]
    assert [row[0] for row in logged.data] == [4, 0]  # max_rows, most suspect first
    assert [row[2:] for row in logged.data] == [[0.9, -3.0, 4.0], [0.7, -0.25, 1.0]]
    with pytest.raises(ValueError, match="four or five \\[n\\] tensors"):
        reporter.report(make_result(), step=4, period="epoch-1",
                        data_value=ValueTable(value[0], value[1], (table[0], table[1][:2], table[2], table[3])))
