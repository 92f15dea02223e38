"""Small CD and CT models, trained by the real loop on data whose law is known, must map noise to
that law: mean and covariance for a Gaussian, component weights and likelihood for a mixture."""

import numpy as np
import pytest
import torch

import cmkit
from cmkit.data import TOY_TRUTH

pytestmark = pytest.mark.slow  # the quick loop (pytest -m 'not slow') leaves these out

FAST = {"data.n": 20000, "train.batch_size": 256, "train.log_every": 1000}


def _train(tmp_path, method, data, steps, **extra):
    config = cmkit.build_config(method, **{"data.name": data, "train.steps": steps, **FAST, **extra})
    return cmkit.load_run(cmkit.train(config, tmp_path / f"{method}-{data}", progress=False))


def _pipeline(tmp_path_factory, data, teacher_steps, cd_steps, ct_steps=None):
    tmp = tmp_path_factory.mktemp(data)
    teacher = _train(tmp, "edm", data, teacher_steps)
    runs = {"teacher": teacher, "cd": _train(tmp, "cd", data, cd_steps, teacher=str(teacher.path))}
    if ct_steps:
        runs["ct"] = _train(tmp, "ct", data, ct_steps)
    return runs


# CT is tested on the mixture only: its component weights at 1 and 2 steps are a stronger check
# of the law than the Gaussian's moments (which CT met with a 0.25 covariance tolerance), and
# 3,000 CT steps cost half a minute. Budgets below these fail the tolerances (measured: CD at 700
# steps has a covariance error of 0.33, CT at 2,000 steps a component-weight error of 0.09).
@pytest.fixture(scope="module")
def gaussian_runs(tmp_path_factory):
    return _pipeline(tmp_path_factory, "gaussian", 1500, 1000)


@pytest.fixture(scope="module")
def gmm_runs(tmp_path_factory):
    return _pipeline(tmp_path_factory, "gmm", 2000, 2000, 3000)


# Tolerances (data units; the Gaussian has variances 1.0 and 0.5, covariance 0.6).
MEAN_TOL = {"teacher": 0.05, "cd": 0.08}
COV_TOL = {"teacher": 0.08, "cd": 0.12}
# Mean true NLL of the samples may exceed real data's (the law's entropy) by at most this much.
# Measured on CPU: teacher (60 Heun steps) +0.02, CD +0.22 (1 step) / +0.29 (2), CT +3.1 / +2.1:
# CT puts many samples between the modes at this budget; the bound still rejects a collapse or
# noise (uniform noise over the plotting box scores about +5).
NLL_TOL = {"teacher": 0.15, "cd": 0.45, "ct": 4.0}
# The teacher's 120-NFE samples are the costly ones (10 s per 20,000 on 2 cores); 10,000 still put
# the sampling error (about 0.01 in the moments, 0.005 in the weights) well inside the tolerances.
TEACHER_N = 10000


def _n(method: str) -> int:
    return TEACHER_N if method == "teacher" else 20000


@pytest.mark.parametrize("method", ["teacher", "cd"])
def test_gaussian_moments(gaussian_runs, method):
    run = gaussian_runs[method]
    truth = TOY_TRUTH["gaussian"]
    steps = 60 if method == "teacher" else 1  # 18 Heun steps alone leave ~9% covariance error here
    x = run.sample(_n(method), steps=steps, seed=1)
    np.testing.assert_allclose(x.mean(0), truth.mean().numpy(), atol=MEAN_TOL[method])
    np.testing.assert_allclose(np.cov(x.T), truth.cov().numpy(), atol=COV_TOL[method])


@pytest.mark.parametrize("method, steps", [("teacher", 60), ("cd", 1), ("cd", 2), ("ct", 1), ("ct", 2)])
def test_gaussian_mixture_weights_and_likelihood(gmm_runs, method, steps):
    truth = TOY_TRUTH["gmm"]
    x = torch.from_numpy(gmm_runs[method].sample(_n(method), steps=steps, seed=2))
    # Assign each sample to its most probable component under the true mixture.
    comp = torch.distributions.MultivariateNormal(truth.means, covariance_matrix=truth.covs)
    owner = (comp.log_prob(x[:, None, :]) + truth.weights.log()).argmax(1)
    share = torch.bincount(owner, minlength=3).double() / len(x)
    torch.testing.assert_close(share, truth.weights, atol=0.05, rtol=0)
    # Mean true negative log-likelihood of the samples, beside that of real data (its entropy).
    data_nll = -truth.log_prob(truth.sample(20000, torch.Generator().manual_seed(3))).mean().item()
    nll = -truth.log_prob(x).mean().item()
    assert nll < data_nll + NLL_TOL[method], (nll, data_nll)


# The objectives of issue 4, on the same Gaussian: ECT, sCT and sCD start from the teacher above.
# Budgets are what each needs here. Measured largest covariance error at 1 step: iCT 0.26 at 1,500
# steps (lr 1e-3; at lr 4e-4 it stalls: its doubling grid is built for 400k steps), ECT 0.27 at
# 2,000 and 0.40 at 1,500 (0.31 at 2,000 with lr 2e-3), sCD 0.29 at 1,500 and 0.11 at 2,000 with
# lr 1e-3, 0.16 at 1,500 with lr 2e-3; passing with margin: sCD 0.05 at 2,000 with lr 2e-3, sCT
# 0.07 at 1,500 (its tangent warm-up is a quarter of the run), MeanFlow 0.05 at 1,500.
MODERN = {"ict": (2000, {"train.lr": 1e-3}), "ect": (3000, {"init": True}), "sct": (1500, {"init": True}),
          "scd": (2000, {"teacher": True, "train.lr": 2e-3}), "meanflow": (1500, {"objective.adaptive_p": 0.0})}
# sCD varies most from run to run here: over seeds, step counts (1,500-3,000) and lr (5e-4-2e-3)
# its errors spread over 0.01-0.36 (mean) and 0.02-0.19 (covariance), with one 1.08; the run below
# measured a covariance error of 0.05 on AMD EPYC, and (0.080, 0.016) on Intel Xeon, the same code. Its mean
# tolerance is iCT's so that a CPU's rounding does not decide the test.
MODERN_TOL = {"ict": (0.1, 0.15), "ect": (0.08, 0.12), "sct": (0.08, 0.12), "scd": (0.1, 0.15),
              "meanflow": (0.08, 0.12)}


@pytest.fixture(scope="module")
def modern_runs(gaussian_runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modern")
    teacher = str(gaussian_runs["teacher"].path)
    runs = {}
    for method, (steps, sources) in MODERN.items():
        extra = {key: (teacher if value is True else value) for key, value in sources.items()}
        runs[method] = _train(tmp, method, "gaussian", steps, **extra)
    return runs


@pytest.mark.parametrize("method", list(MODERN_TOL))
def test_modern_methods_reach_gaussian_moments_in_one_step(modern_runs, method):
    truth = TOY_TRUTH["gaussian"]
    x = modern_runs[method].sample(20000, steps=1, seed=1)
    mean_tol, cov_tol = MODERN_TOL[method]
    np.testing.assert_allclose(x.mean(0), truth.mean().numpy(), atol=mean_tol)
    np.testing.assert_allclose(np.cov(x.T), truth.cov().numpy(), atol=cov_tol)


def test_meanflow_learns_the_flow(modern_runs):
    """MeanFlow at 1,500 steps, beside its 1-step test: 16 short jumps of u(z_t, r, t) from t = 1 to 0
    follow the flow to the right law too. The run uses p = 0: the adaptive weight biases
    low-dimensional data (per-sample errors do not concentrate in 2-D, so it acts as a robust loss)."""
    run = modern_runs["meanflow"]
    truth = TOY_TRUTH["gaussian"]
    ts = torch.linspace(1, 0, 17)
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t, r in zip(ts[:-1], ts[1:]):
            tt, rr = torch.full((len(z),), float(t)), torch.full((len(z),), float(r))
            z = z - (t - r) * run.model.velocity(z, rr, tt)
    x = run.scaler.to_data(z)
    np.testing.assert_allclose(x.mean(0), truth.mean().numpy(), atol=0.08)
    np.testing.assert_allclose(np.cov(x.T), truth.cov().numpy(), atol=0.12)


# TCM continues a stage-1 run for sigma >= 1 with the frozen stage-1 model below: from the mixture's
# CT run (3,000 steps) and the Gaussian's CD run, 1,500 more steps each. Measured on the mixture at
# 1 step: component-weight error 0.027 (CT) against 0.018 (TCM), NLL 5.44 against 4.76.
@pytest.fixture(scope="module")
def tcm_runs(gaussian_runs, gmm_runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tcm")
    return {data: _train(tmp, "tcm", data, 1500, init=str(runs[stage1].path))
            for data, runs, stage1 in (("gmm", gmm_runs, "ct"), ("gaussian", gaussian_runs, "cd"))}


def _weights_error_and_nll(run, steps: int) -> tuple[float, float]:
    truth = TOY_TRUTH["gmm"]
    x = torch.from_numpy(run.sample(20000, steps=steps, seed=2))
    comp = torch.distributions.MultivariateNormal(truth.means, covariance_matrix=truth.covs)
    owner = (comp.log_prob(x[:, None, :]) + truth.weights.log()).argmax(1)
    share = torch.bincount(owner, minlength=3).double() / len(x)
    return float((share - truth.weights).abs().max()), -truth.log_prob(x).mean().item()


def test_tcm_reaches_gaussian_moments_in_one_step(tcm_runs):
    truth = TOY_TRUTH["gaussian"]
    x = tcm_runs["gaussian"].sample(20000, steps=1, seed=1)
    np.testing.assert_allclose(x.mean(0), truth.mean().numpy(), atol=MEAN_TOL["cd"])
    np.testing.assert_allclose(np.cov(x.T), truth.cov().numpy(), atol=COV_TOL["cd"])


def test_tcm_beats_its_stage1_model_in_one_step_on_the_mixture(tcm_runs, gmm_runs):
    """One step, where TCM's claim lies (at 2 steps both are at 0.03; 20,000 samples put the
    weights' sampling error near 0.003)."""
    tcm_error, tcm_nll = _weights_error_and_nll(tcm_runs["gmm"], 1)
    ct_error, ct_nll = _weights_error_and_nll(gmm_runs["ct"], 1)
    assert tcm_error < 0.05 and tcm_error < ct_error - 0.004, (tcm_error, ct_error)
    assert tcm_nll < ct_nll - 0.3, (tcm_nll, ct_nll)
