"""The variance decomposition on synthetic factorial grids with known effects."""

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.variance import WITHIN, variance_frame


def grid(noise=0.0, seeds=(0, 1)):
    """a: +-1 (main effect), b: 0, 2, -2 (main effect), a x b: +-0.5 on b's second level only; c: no effect."""
    rng = np.random.default_rng(0)
    rows = []
    for a, b, c, seed in itertools.product(["a0", "a1"], ["b0", "b1", "b2"], ["c0", "c1"], seeds):
        sa = 1.0 if a == "a1" else -1.0
        sb = {"b0": 0.0, "b1": 2.0, "b2": -2.0}[b]
        inter = 0.5 * sa * {"b0": 0.0, "b1": 1.0, "b2": -1.0}[b]
        rows.append({"a": a, "b": b, "c": c, "seed": seed, "value": 3.0 + sa + sb + inter + noise * rng.normal()})
    return pd.DataFrame(rows)


def test_known_effects_get_their_exact_sums_of_squares():
    frame = variance_frame(grid(), ["a", "b", "c"]).set_index("effect")
    n = 24  # 2 x 3 x 2 cells x 2 seeds
    assert frame.loc["a", "ss"] == pytest.approx(n * 1.0)
    assert frame.loc["b", "ss"] == pytest.approx(n * (0 + 4 + 4) / 3)
    assert frame.loc["a x b", "ss"] == pytest.approx(n * (0 + 0.25 + 0.25) / 3)
    zero = ["c", "a x c", "b x c", "a x b x c", WITHIN]
    assert frame.loc[zero, "ss"].abs().max() == pytest.approx(0.0, abs=1e-9)
    assert frame["share"].sum() == pytest.approx(1.0)
    assert frame.loc["b", "share"] == pytest.approx(64 / (24 + 64 + 4))
    assert list(frame["df"]) == [1, 2, 1, 2, 1, 2, 2, 12]
    assert list(frame["order"]) == [1, 1, 1, 2, 2, 2, 3, 0]


def test_seed_noise_goes_within_cells_and_shares_still_sum_to_one():
    frame = variance_frame(grid(noise=0.3), ["a", "b", "c"]).set_index("effect")
    assert frame["share"].sum() == pytest.approx(1.0)
    assert 0 < frame.loc[WITHIN, "share"] < 0.1
    assert frame.loc["b", "share"] > frame.loc["a", "share"] > frame.loc["c", "share"]


def test_incomplete_or_unbalanced_grids_are_refused_in_one_line():
    df = grid()
    with pytest.raises(ValueError, match="12 cells, 11 with a trial"):
        variance_frame(df[~((df["a"] == "a0") & (df["b"] == "b0") & (df["c"] == "c0"))], ["a", "b", "c"])
    with pytest.raises(ValueError, match="equal counts"):
        variance_frame(df.iloc[1:], ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one factor"):
        variance_frame(df, [])
