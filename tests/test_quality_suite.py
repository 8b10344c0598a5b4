"""Helpers of the quality suite (benchmarks/quality): the exact Gram matrices from factors and the
on-disk cache, against references computed here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality.cache import Cache  # noqa: E402
from benchmarks.quality.methods import exact_grams, plan_signature  # noqa: E402
from grass_callback.projection import LayerShape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _gram_by_hand(x: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    """<G_i, G_j> with G_i = Σ_t δ_it [x_it, 1]^T built entry by entry, float64."""
    flats = []
    for xi, di in zip(x.double(), d.double()):
        g = torch.zeros(di.shape[-1], xi.shape[-1] + int(bias), dtype=torch.float64)
        for xt, dt in zip(xi, di):
            xe = torch.cat([xt, torch.ones(1, dtype=torch.float64)]) if bias else xt
            g += torch.outer(dt, xe)
        flats.append(g.flatten())
    flat = torch.stack(flats)
    return flat @ flat.T


@pytest.mark.parametrize("T", [1, 3])  # one token: (x x^T + 1) * (δ δ^T); several: materialized
@pytest.mark.parametrize("bias", [True, False])
def test_exact_grams_equal_the_gram_of_the_per_example_gradients(T, bias):
    g = torch.Generator().manual_seed(T + 2 * bias)
    shapes = {"a": LayerShape(5, 4, bias), "b": LayerShape(3, 7, bias)}
    factors = {name: (torch.randn(9, T, s.d_in, generator=g), torch.randn(9, T, s.d_out, generator=g))
               for name, s in shapes.items()}
    grams = exact_grams(shapes, factors, chunk=4)
    for name, s in shapes.items():
        gram, numel = grams[name]
        assert numel == s.numel
        torch.testing.assert_close(gram, _gram_by_hand(*factors[name], bias), rtol=1e-5, atol=1e-5)


def test_cache_computes_once_per_description_and_never_reads_a_mismatched_entry(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def compute(v):
        calls.append(v)
        return {"value": torch.tensor([float(v)])}

    first = cache.get_or_compute("rows", {"w": "a", "seed": 0}, lambda: compute(1))
    again = cache.get_or_compute("rows", {"seed": 0, "w": "a"}, lambda: compute(2))  # same key, other order
    other = cache.get_or_compute("rows", {"w": "a", "seed": 1}, lambda: compute(3))
    assert calls == [1, 3] and float(again["value"]) == 1.0 and float(other["value"]) == 3.0
    assert float(first["value"]) == 1.0
    # an entry whose saved description differs from the key's (a collision, a hand edit) is recomputed
    (path,) = [p for p in (tmp_path / "rows").iterdir()
               if torch.load(p, weights_only=False)["description"]["seed"] == 0]
    saved = torch.load(path, weights_only=False)
    saved["description"]["seed"] = 99
    torch.save(saved, path)
    assert float(cache.get_or_compute("rows", {"w": "a", "seed": 0}, lambda: compute(4))["value"]) == 4.0
    assert Cache(None).get_or_compute("rows", {"w": "a", "seed": 1}, lambda: compute(5))["value"] == 5.0
    assert calls == [1, 3, 4, 5]


def test_plan_signature_follows_mask_sizes_and_seed():
    shapes = {"fc": LayerShape(128, 384, True)}
    base = plan_signature("factgrass-2sqrtk", shapes, 1024, 0)
    assert (base["layers"]["fc"]["k_in"], base["layers"]["fc"]["k_out"]) == (64, 64)
    wide = plan_signature("factgrass-x2", shapes, 1024, 0)
    assert (wide["layers"]["fc"]["k_in"], wide["layers"]["fc"]["k_out"]) == (91, 91)
    assert plan_signature("factgrass-2sqrtk", shapes, 1024, 1) != base
    assert plan_signature("gaussian", shapes, 1024, 0)["layers"]["fc"] == {"dim": 129 * 384, "k": 1024, "seed": 0}


@pytest.mark.parametrize("split", ["proportional", "wide"])
def test_split_sizes_fit_the_layer_and_the_budget(split):
    from benchmarks.quality.methods import _split_sizes

    g = torch.Generator().manual_seed(7)
    for _ in range(200):
        d_in, d_out = (int(v) for v in torch.randint(2, 3000, (2,), generator=g))
        shape = LayerShape(d_in, d_out, bool(torch.randint(0, 2, (1,), generator=g)))
        sizes = _split_sizes(split, shape, 1024)
        if shape.numel <= 1024:
            assert sizes == {}
            continue
        k_in, k_out = sizes["k_in"], sizes["k_out"]
        assert 1 <= k_in <= shape.d_in_eff and 1 <= k_out <= d_out and k_in * k_out >= 1024
        if split == "wide":
            assert (k_out == d_out) if d_out >= shape.d_in_eff else (k_in == shape.d_in_eff)
