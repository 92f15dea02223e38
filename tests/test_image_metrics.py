"""Image metrics against truth: Frechet distance closed forms, precision/recall on constructed
sets, the pinned classifier's accuracy, and FD of real data vs the floor and vs noise."""

import hashlib

import numpy as np
import pytest
import torch

from cmkit.data.images import load_fashion_mnist
from cmkit.errors import CmkitError
from cmkit.metrics import frechet_distance, frechet_distance_features, gaussian_stats, precision_recall
from cmkit.metrics import classifier as clf


def test_fd_one_dimensional_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_fd_commuting_and_general_covariances():
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.25])
    expected = sum((np.sqrt(x) - np.sqrt(y)) ** 2 for x, y in [(1, 4), (4, 1), (9, 0.25)])
    assert frechet_distance(np.zeros(3), a, np.zeros(3), b) == pytest.approx(expected, rel=1e-12)
    # Non-commuting: compare with the matrix square root by scipy (a different algorithm).
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_fd_from_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, (200_000, 2))
    b = rng.normal(0.5, 2.0, (200_000, 2))
    assert frechet_distance_features(a, b) == pytest.approx(2 * 0.25 + 2 * 1.0, rel=0.02)
    mu, cov = gaussian_stats(a)
    assert cov.shape == (2, 2) and mu.dtype == np.float64


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(1000, 2))
    same = precision_recall(real, real.copy())
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # A generator that covers only the left half: precise but half the recall.
    half = real[real[:, 0] < 0]
    pr = precision_recall(real, half)
    assert pr["precision"] == 1.0 and 0.4 < pr["recall"] < 0.65


def test_packaged_classifier_checksum_is_pinned():
    path = clf.default_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == clf.WEIGHTS_SHA256
    assert path.stat().st_size < 2_000_000


def test_tampered_classifier_is_refused(monkeypatch):
    monkeypatch.setattr(clf, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(CmkitError, match="SHA-256"):
        clf.load_classifier()


@pytest.fixture(scope="module")
def fashion():
    train, _ = load_fashion_mnist(None, "train")
    test, test_labels = load_fashion_mnist(None, "test")
    return torch.from_numpy(train)[:, None], torch.from_numpy(test)[:, None], torch.from_numpy(test_labels.astype(np.int64))


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_classifier_is_at_least_90_percent_accurate(fashion):
    _, test, labels = fashion
    assert clf.accuracy(clf.load_classifier(), test, labels) >= 0.90


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_fd_of_real_data_is_near_the_floor_and_noise_is_far(fashion):
    train, test, _ = fashion
    model = clf.load_classifier()
    rng = np.random.default_rng(3)
    ref = clf.extract_features(model, test[:5000])
    train_a = clf.extract_features(model, train[torch.from_numpy(rng.permutation(60000)[:5000])])
    train_b = clf.extract_features(model, train[torch.from_numpy(rng.permutation(60000)[:5000])])
    floor = frechet_distance_features(train_a, ref)
    again = frechet_distance_features(train_b, ref)
    noise = torch.from_numpy(rng.integers(0, 256, (5000, 1, 28, 28), dtype=np.uint8))
    far = frechet_distance_features(clf.extract_features(model, noise), ref)
    assert again < 2 * floor + 0.5  # two real draws agree
    assert far > 50 * floor  # uniform noise is nowhere near
    # Padding then cropping back is exact, so padded images score as the originals.
    padded = torch.nn.functional.pad(test[:100], (2, 2, 2, 2))
    np.testing.assert_allclose(clf.extract_features(model, padded, native_size=28),
                               clf.extract_features(model, test[:100]), rtol=1e-6, atol=1e-6)


def test_inception_loads_weights_only_and_refuses_pickles(tmp_path):
    from cmkit.metrics.inception import FIDInception, inception_features, load_fid_inception

    torch.manual_seed(0)
    state = FIDInception().state_dict()
    state["fc.weight"] = torch.zeros(1008, 2048)  # the real file carries the classifier; it is dropped
    torch.save(state, tmp_path / "w.pth")
    model = load_fid_inception(tmp_path / "w.pth")
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    feats = inception_features(model, images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    # Greyscale is repeated to RGB: the same picture in colour gives the same features.
    np.testing.assert_allclose(inception_features(model, images.repeat(1, 3, 1, 1)), feats, rtol=1e-5, atol=1e-5)

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CmkitError, match="weights-only"):
        load_fid_inception(tmp_path / "evil.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CmkitError, match="not the FID Inception"):
        load_fid_inception(tmp_path / "other.pth")
    with pytest.raises(CmkitError, match="never downloads"):
        load_fid_inception(None)
