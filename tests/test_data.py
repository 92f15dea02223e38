import numpy as np
import pytest
import torch

from cmkit.data import Standardizer, TOY_SETS, TOY_TRUTH, load_vectors
from cmkit.errors import CmkitError


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_builtin_sets_are_seeded_2d_and_finite(name):
    a = load_vectors(name, n=500, n_holdout=200, seed=3)
    b = load_vectors(name, n=500, n_holdout=200, seed=3)
    assert a.train.shape == (500, 2) and a.holdout.shape == (200, 2)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.allclose(a.train[:200], a.holdout)  # held-out points are fresh draws
    assert np.isfinite(a.train).all()


@pytest.mark.parametrize("name", sorted(TOY_TRUTH))
def test_known_sets_sample_their_stated_distribution(name):
    truth = TOY_TRUTH[name]
    x = load_vectors(name, n=200_000, n_holdout=10).train
    np.testing.assert_allclose(x.mean(0), truth.mean().numpy(), atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), truth.cov().numpy(), atol=0.03)


def test_checkerboard_occupies_only_dark_squares():
    x = load_vectors("checkerboard", n=5000).train
    cells = np.floor(x + 2).astype(int)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


def test_files_npy_npz_csv_load_the_same_array(tmp_path):
    arr = np.random.default_rng(0).standard_normal((50, 3))
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "a.npz", data=arr)
    np.savetxt(tmp_path / "a.csv", arr, delimiter=",", header="x,y,z", comments="")
    loaded = [load_vectors(str(tmp_path / f"a.{ext}"), seed=1) for ext in ("npy", "npz", "csv")]
    for v in loaded:
        assert v.train.shape == (45, 3) and v.holdout.shape == (5, 3)
        np.testing.assert_allclose(v.train, loaded[0].train)
    rows = {tuple(r) for r in np.concatenate([loaded[0].train, loaded[0].holdout]).round(8)}
    assert rows == {tuple(r) for r in arr.round(8)}  # a split, nothing lost or duplicated


@pytest.mark.parametrize("content, message", [
    (np.zeros(5), "must have shape"),
    (np.zeros((2, 2, 2)), "must have shape"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or inf"),
    (np.array([["a", "b"], ["c", "d"]]), "numeric"),
])
def test_bad_arrays_are_rejected_with_the_reason(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(CmkitError, match=message):
        load_vectors(str(tmp_path / "bad.npy"))


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(CmkitError, match="not found"):
        load_vectors(str(tmp_path / "nope.npy"))
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(CmkitError, match="unknown data"):
        load_vectors(str(tmp_path / "x.txt"))


def test_standardizer_round_trip_and_scale():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 0.0]
    st = Standardizer.fit(data, sigma_data=0.5)
    x = st.to_model(data)
    np.testing.assert_allclose(x.std(0, unbiased=False).numpy(), 0.5, rtol=1e-5)
    np.testing.assert_allclose(x.mean(0).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(st.to_data(x), data, rtol=1e-5, atol=1e-5)
    again = Standardizer.from_state(st.state())
    np.testing.assert_allclose(again.to_data(torch.zeros(1, 3))[0], data.mean(0))
