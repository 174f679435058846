"""SWAGModule: BMA outputs against explicit per-sample averages, shapes, errors, MultiSWAG."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from conftest import QUIET, random_walk_posterior
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.posterior.noise import derive_seed

_posterior_for = random_walk_posterior  # step 0.2


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))


def _explicit_outputs(net, post, x, num_samples, scale, seed, diagonal_only=False, posterior_index=0):
    """The reference BMA: draw weights, load them into a copy of the model, run it, one sample at a time.

    SWAGModule documents that sample i of posterior j is sample i of ``derive_seed(seed, j)``."""
    drawn = post.diagonal() if diagonal_only else post
    weights = drawn.sample(num_samples, scale=scale, seed=derive_seed(seed, posterior_index))
    model = copy.deepcopy(net).eval()
    outs = []
    with torch.no_grad():
        for w in weights:
            post.load_into(model, w.float())
            outs.append(model(x))
    return torch.stack(outs)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("covariance", ["low_rank", "diagonal"])
def test_regression_bma_equals_explicit_average(vectorize: bool, covariance: str) -> None:
    net = _regressor()
    post = _posterior_for(net)
    x = torch.randn(7, 2)
    bma = SWAGModule(
        net, post, num_samples=20, seed=5, vectorize=vectorize, covariance=covariance, return_samples=True
    )
    out = bma(x)
    ref = _explicit_outputs(net, post, x, 20, 0.5, 5, diagonal_only=covariance == "diagonal")
    torch.testing.assert_close(out["samples"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mean"], ref.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["std"], ref.std(0, correction=0), rtol=1e-4, atol=1e-5)
    assert out["mean"].shape == out["std"].shape == (7, 2)


def test_classification_outputs() -> None:
    net = _classifier()
    post = _posterior_for(net)
    x = torch.randn(11, 5)
    out = SWAGModule(net, post, num_samples=25, seed=1, task="classification", return_samples=True)(x)
    probs = torch.softmax(out["samples"], dim=-1)
    assert out["samples"].shape == (25, 11, 3)
    torch.testing.assert_close(out["mean"].sum(-1), torch.ones(11))
    torch.testing.assert_close(out["mean"], probs.mean(0))
    torch.testing.assert_close(out["std"], probs.std(0, correction=0))
    entropy = -(out["mean"] * out["mean"].log()).sum(-1)
    torch.testing.assert_close(out["entropy"], entropy)
    mean_entropy = -(probs * probs.log()).sum(-1).mean(0)
    torch.testing.assert_close(out["mutual_information"], (entropy - mean_entropy).clamp(min=0))
    assert (out["mutual_information"] >= 0).all()


def test_scale_zero_single_sample_is_exactly_swa() -> None:
    net = _classifier()
    post = _posterior_for(net)
    swa = copy.deepcopy(net)
    post.load_into(swa)
    x = torch.randn(9, 5)
    out = SWAGModule(net, post, num_samples=1, scale=0.0, task="regression", return_samples=True)(x)
    torch.testing.assert_close(out["mean"], swa(x).detach(), rtol=0, atol=0)
    assert torch.equal(out["std"], torch.zeros_like(out["std"]))


def test_same_weight_samples_for_every_batch_and_seed_reproducible() -> None:
    net = _regressor()
    post = _posterior_for(net)
    x = torch.randn(6, 2)
    loader = DataLoader(TensorDataset(torch.cat([x, x]), torch.zeros(12)), batch_size=6)
    trainer = L.Trainer(**QUIET)
    first, second = trainer.predict(SWAGModule(net, post, num_samples=15, seed=2), loader)
    torch.testing.assert_close(first["mean"], second["mean"], rtol=0, atol=0)
    again = trainer.predict(SWAGModule(net, post, num_samples=15, seed=2), loader)
    torch.testing.assert_close(again[0]["std"], first["std"], rtol=0, atol=0)


def test_chunking_bounds_each_call_and_keeps_statistics() -> None:
    net = _regressor()
    post = _posterior_for(net)
    x = torch.randn(500, 2)
    small = SWAGModule(net, post, num_samples=400, seed=0, chunk_size=7, return_samples=True)(x)
    assert small["samples"].shape == (400, 500, 2)
    big = SWAGModule(net, post, num_samples=400, seed=1)(x)
    # different draws, same distribution: BMA means agree to Monte-Carlo error
    assert (small["mean"] - big["mean"]).abs().mean() < 0.1 * big["std"].mean()


def test_multiswag_averages_over_all_posteriors() -> None:
    net = _regressor()
    posts = [_posterior_for(net, seed=s) for s in (0, 1, 2)]
    x = torch.randn(4, 2)
    bma = SWAGModule(net, posts, num_samples=5, seed=0, return_samples=True)
    out = bma(x)
    assert out["samples"].shape == (15, 4, 2)
    torch.testing.assert_close(out["mean"], out["samples"].mean(0))
    # the first five samples are posterior 0's, drawn as documented
    ref = _explicit_outputs(net, posts[0], x, 5, 0.5, 0)
    torch.testing.assert_close(out["samples"][:5], ref, rtol=1e-5, atol=1e-5)


def test_batch_layouts() -> None:
    net = _regressor()
    bma = SWAGModule(net, _posterior_for(net), num_samples=3, seed=0)
    x = torch.randn(4, 2)
    a = bma.predict_step(x, 0)
    bma.reset_samples()
    b = bma.predict_step((x, torch.zeros(4)), 0)
    torch.testing.assert_close(a["mean"], b["mean"])
    bma.reset_samples()
    c = bma.predict_step({"input": x, "labels": torch.zeros(4)}, 0)  # a mapping: model(**inputs)
    torch.testing.assert_close(a["mean"], c["mean"])


def test_errors_name_the_problem() -> None:
    net = _classifier()
    empty = SWAGPosterior.from_model(net)
    with pytest.raises(ValueError, match="no snapshots"):
        SWAGModule(net, empty)
    other = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3))
    with pytest.raises(ValueError, match=r"does not match.*shape mismatches"):
        SWAGModule(other, _posterior_for(net))
    renamed = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="missing parameters"):
        SWAGModule(renamed, _posterior_for(net))
    with pytest.raises(ValueError, match="task"):
        SWAGModule(net, _posterior_for(net), task="segmentation")
    with pytest.raises(ValueError, match="num_samples"):
        SWAGModule(net, _posterior_for(net), num_samples=0)
    with pytest.raises(ValueError, match="scale"):
        SWAGModule(net, _posterior_for(net), scale=-0.5)
    with pytest.raises(RuntimeError, match="no posterior"):
        SWAGModule(net)(torch.randn(2, 5))


@pytest.mark.parametrize("as_list", [False, True], ids=["one", "list"])
def test_a_state_dict_given_as_posterior_says_how_to_load_it(as_list: bool) -> None:
    net = _classifier()
    post = _posterior_for(net)
    state = post.state_dict()
    with pytest.raises(TypeError, match="is a state dict") as err:
        SWAGModule(net, [state] if as_list else state)
    assert "SWAGPosterior.from_state_dict(state)" in str(err.value) and "is a str" not in str(err.value)
    loaded = SWAGModule(net, SWAGPosterior.from_state_dict(state), seed=0)  # the fix the message gives
    torch.testing.assert_close(loaded.posterior.mean, post.mean)


def test_non_vmappable_model_falls_back_with_a_warning() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            out = self.lin(x)
            if out.sum() > 1e9:  # data-dependent control flow: vmap cannot trace it
                return out * 0
            return out

    torch.manual_seed(0)
    net = DataDependent()
    post = _posterior_for(net)
    x = torch.randn(3, 2)
    with pytest.warns(UserWarning, match="falling back"):
        out = SWAGModule(
            net, post, num_samples=4, seed=1, return_samples=True, vectorize="vmap", split_forward=False
        )(x)
    torch.testing.assert_close(out["samples"], _explicit_outputs(net, post, x, 4, 0.5, 1))


def test_trainer_test_logs_uncertainty_metrics_of_the_bma() -> None:
    from lightning_swag import metrics

    net = _classifier()
    post = _posterior_for(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 5, generator=g), torch.randint(0, 3, (70,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(**QUIET)
    logged = trainer.test(SWAGModule(net, post, num_samples=12, seed=4, task="classification"), loader)[0]
    batches = trainer.predict(SWAGModule(net, post, num_samples=12, seed=4, task="classification"), loader)
    probs = torch.cat([b["mean"] for b in batches])
    mi = torch.cat([b["mutual_information"] for b in batches])
    expected = metrics.classification_metrics(probs, y)
    for key in ("accuracy", "nll", "brier", "ece", "entropy"):
        assert logged[f"test_{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert logged["test_mutual_information"] == pytest.approx(mi.mean().item(), rel=1e-4)


def test_trainer_test_regression_rmse() -> None:
    net = _regressor()
    post = _posterior_for(net)
    x, y = torch.randn(40, 2), torch.randn(40, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(**QUIET)
    logged = trainer.test(SWAGModule(net, post, num_samples=9, seed=1), loader)[0]
    out = SWAGModule(net, post, num_samples=9, seed=1)(x)
    assert logged["test_rmse"] == pytest.approx((out["mean"] - y).square().mean().sqrt().item(), rel=1e-5)
    assert logged["test_mean_std"] == pytest.approx(out["std"].mean().item(), rel=1e-5)


def test_bma_runs_the_model_in_eval_mode_and_restores_its_modes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    post = _posterior_for(net)
    net.train()
    net[1].eval()  # a mixed state must come back as it was
    x = torch.randn(5, 3)
    first = SWAGModule(net, post, num_samples=4, seed=0, return_samples=True)(x)
    second = SWAGModule(net, post, num_samples=4, seed=0, return_samples=True)(x)
    torch.testing.assert_close(first["samples"], second["samples"], rtol=0, atol=0)  # no dropout noise
    torch.testing.assert_close(first["samples"], _explicit_outputs(net, post, x, 4, 0.5, 0))
    assert [m.training for m in net.modules()] == [True, True, False, True]


def test_long_steps_show_progress_during_predict(capsys) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    post = _posterior_for(net)
    train = [(torch.randn(16, 3), torch.zeros(16)) for _ in range(4)]
    bma = SWAGModule(net, post, num_samples=6, chunk_size=2, seed=0, bn_loader=train)
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.zeros(10)), batch_size=5)
    trainer = L.Trainer(**{**QUIET, "enable_progress_bar": True})
    out = trainer.predict(bma, loader)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "SWAG: sampling weights" in printed and "/3 " in printed  # 3 chunks of 2 samples
    assert "SWAG: BatchNorm refresh" in printed
    assert "Predicting" in printed  # Lightning's own bar (TQDM, or Rich where it is installed)
    assert out[0]["mean"].shape == (5, 2)
    # without a progress bar nothing extra is printed
    L.Trainer(**QUIET).predict(
        SWAGModule(net, post, num_samples=6, chunk_size=2, seed=0, bn_loader=train), loader
    )
    captured = capsys.readouterr()
    assert "SWAG:" not in captured.out + captured.err


def test_tune_scale_scores_every_candidate_and_keeps_the_best() -> None:
    net = _classifier()
    post = _posterior_for(net, snapshots=8)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(60, 5, generator=g)
    y = net(x).argmax(-1).detach()
    y[::3] = (y[::3] + 1) % 3  # some labels the SWA model gets wrong, so the scale matters
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    bma = SWAGModule(net, post, num_samples=15, seed=2, task="classification")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = bma.tune_scale(loader, scales=[0.0, 0.5, 2.0])
    edge_warnings = [w for w in caught if "edge of the candidates" in str(w.message)]
    assert len(edge_warnings) == (1 if bma.scale == 2.0 else 0)
    assert list(scores) == [0.0, 0.5, 2.0]
    for scale, score in scores.items():
        # Independent: a fresh module at that scale, the same seed, NLL over the whole set at once.
        probs = SWAGModule(net, post, num_samples=15, seed=2, task="classification", scale=scale)(x)["mean"]
        expected = -probs.gather(1, y.unsqueeze(1)).log().mean()
        assert score == pytest.approx(float(expected), rel=1e-5)
    assert bma.scale == min(scores, key=scores.get)
    assert len(set(scores.values())) == 3


def test_tune_scale_rejects_bad_input() -> None:
    net = _classifier()
    post = _posterior_for(net)
    loader = [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="noise model"):
        SWAGModule(net, post, task="regression").tune_scale(loader)
    bma = SWAGModule(net, post, task="classification")
    with pytest.raises(ValueError, match="scales"):
        bma.tune_scale(loader, scales=[])
    with pytest.raises(ValueError, match="scales"):
        bma.tune_scale(loader, scales=[0.5, -1.0])
    with pytest.raises(ValueError, match="empty"):
        bma.tune_scale([])
    with pytest.raises(TypeError, match="labelled"):
        bma.tune_scale([torch.randn(4, 5)])


# ---------------------------------------------------------------------- issue 9: silent wrong results


def _labelled(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g) + shift, torch.randint(0, 3, (n,), generator=g)


def test_trainer_test_with_two_dataloaders_reports_each_one_separately() -> None:
    net = _classifier()
    post = _posterior_for(net)
    a, b = _labelled(48, 1), _labelled(30, 2, shift=3.0)
    loaders = [DataLoader(TensorDataset(*a), batch_size=16), DataLoader(TensorDataset(*b), batch_size=16)]

    def bma() -> SWAGModule:
        return SWAGModule(net, post, num_samples=6, seed=3, task="classification")

    both = L.Trainer(**QUIET).test(bma(), loaders)
    alone = [L.Trainer(**QUIET).test(bma(), loader)[0] for loader in loaders]
    assert len(both) == 2
    for index, (got, want) in enumerate(zip(both, alone, strict=True)):
        suffix = f"/dataloader_idx_{index}"
        assert set(got) == {key + suffix for key in want}, got.keys()
        for key, value in want.items():
            assert got[key + suffix] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert both[0]["test_accuracy/dataloader_idx_0"] != both[1]["test_accuracy/dataloader_idx_1"]


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_seed_fixes_the_samples_whatever_the_chunking(vectorize: bool) -> None:
    net = _regressor()
    post = _posterior_for(net, snapshots=9, max_rank=5)
    x = torch.randn(7, 2)
    outputs = [
        SWAGModule(
            net, post, num_samples=10, seed=5, chunk_size=chunk, vectorize=vectorize, return_samples=True
        )(x)
        for chunk in (1, 3, 4, None)
    ]
    for out in outputs[1:]:
        torch.testing.assert_close(out["samples"], outputs[0]["samples"], rtol=1e-6, atol=1e-6)
    # and whatever the number of batches: two halves equal the whole batch
    bma = SWAGModule(net, post, num_samples=10, seed=5, chunk_size=3, return_samples=True)
    halves = torch.cat([bma(x[:3])["samples"], bma(x[3:])["samples"]], dim=1)
    torch.testing.assert_close(halves, outputs[0]["samples"], rtol=1e-6, atol=1e-6)


def test_compiled_model_takes_the_plain_models_posterior() -> None:
    net = _regressor()
    post = _posterior_for(net)
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(4, 2)
    plain = SWAGModule(net, post, num_samples=5, seed=0)(x)
    via_compiled = SWAGModule(compiled, post, num_samples=5, seed=0)(x)
    torch.testing.assert_close(via_compiled["mean"], plain["mean"])
    torch.testing.assert_close(via_compiled["std"], plain["std"])
    # and a posterior collected from the compiled module carries no wrapper prefix
    from_compiled = _posterior_for(compiled)
    assert from_compiled.param_names == post.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    SWAGModule(net, from_compiled, num_samples=2, seed=0)(x)


class _TupleOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor):
        out = self.body(x)
        if self.kind == "tuple":
            return out, out.sum(-1)
        return {"logits": out, "aux": out.sum(-1)}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_output_transform_picks_the_tensor_to_average(kind: str) -> None:
    torch.manual_seed(0)
    net = _TupleOutput(kind)
    post = _posterior_for(net)
    x = torch.randn(4, 2)
    if kind == "tuple":
        with pytest.raises(TypeError, match=r"tuple.*output_transform"):
            SWAGModule(net, post, num_samples=3, seed=0)(x)
    else:  # a mapping with "logits" (Hugging Face's outputs) needs no output_transform
        auto = SWAGModule(net, post, num_samples=3, seed=0, return_samples=True)(x)
    pick = (lambda out: out[0]) if kind == "tuple" else (lambda out: out["logits"])
    got = SWAGModule(net, post, num_samples=3, seed=0, output_transform=pick, return_samples=True)(x)
    plain = SWAGModule(net.body, _rename(post, "body."), num_samples=3, seed=0, return_samples=True)(x)
    torch.testing.assert_close(got["samples"], plain["samples"])
    if kind == "dict":
        torch.testing.assert_close(auto["samples"], plain["samples"])


def _rename(post: SWAGPosterior, prefix: str) -> SWAGPosterior:
    """The same posterior for the submodule under ``prefix``."""
    state = post.state_dict()
    state["param_shapes"] = {k.removeprefix(prefix): v for k, v in state["param_shapes"].items()}
    return SWAGPosterior.from_state_dict(state)


class _DictBatches(SWAGModule):
    def batch_inputs(self, batch):
        return batch["features"]

    def batch_targets(self, batch):
        return batch["label"]


class _Batches:
    """A loader that yields the given batches (a plain list would be taken for a list of loaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def test_dict_batches_through_one_pair_of_override_points() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    post = _posterior_for(net)
    x, y = _labelled(40, 3)
    dict_batches = _Batches([{"features": x[i : i + 10], "label": y[i : i + 10]} for i in range(0, 40, 10)])
    tuple_batches = _Batches([(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)])

    def build(cls, bn_loader):
        return cls(net, post, num_samples=4, seed=1, task="classification", bn_loader=bn_loader)

    trainer = L.Trainer(**QUIET)
    want_pred = trainer.predict(build(SWAGModule, tuple_batches), tuple_batches)
    got_pred = trainer.predict(build(_DictBatches, dict_batches), dict_batches)
    for got, want in zip(got_pred, want_pred, strict=True):
        torch.testing.assert_close(got["mean"], want["mean"])
    assert trainer.test(build(_DictBatches, dict_batches), dict_batches) == trainer.test(
        build(SWAGModule, tuple_batches), tuple_batches
    )
    assert build(_DictBatches, dict_batches).tune_scale(dict_batches, [0.5, 1.0]) == pytest.approx(
        build(SWAGModule, tuple_batches).tune_scale(tuple_batches, [0.5, 1.0])
    )


def test_tune_scale_accepts_a_datamodule_and_uses_its_validation_loader() -> None:
    net = _classifier()
    post = _posterior_for(net)
    x, y = _labelled(40, 4)

    class DM(L.LightningDataModule):
        def val_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=10)

    def bma() -> SWAGModule:
        return SWAGModule(net, post, num_samples=4, seed=1, task="classification")

    assert bma().tune_scale(DM(), [0.5, 1.0]) == bma().tune_scale(DM().val_dataloader(), [0.5, 1.0])


@pytest.mark.parametrize("seed", [1.5, "3", True, -1])
def test_a_bad_seed_is_refused_at_construction(seed) -> None:
    net = _regressor()
    with pytest.raises((TypeError, ValueError), match="seed"):
        SWAGModule(net, _posterior_for(net), seed=seed)


def test_regression_test_with_multi_output_targets() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    post = _posterior_for(net)
    x, y = torch.randn(30, 2), torch.randn(30, 3)
    logged = L.Trainer(**QUIET).test(
        SWAGModule(net, post, num_samples=5, seed=1), DataLoader(TensorDataset(x, y), batch_size=8)
    )[0]
    out = SWAGModule(net, post, num_samples=5, seed=1)(x)
    assert logged["test_rmse"] == pytest.approx((out["mean"] - y).square().mean().sqrt().item(), rel=1e-5)


def test_regression_targets_of_another_shape_are_a_clear_error() -> None:
    net = _regressor()  # two outputs
    post = _posterior_for(net)
    loader = DataLoader(TensorDataset(torch.randn(12, 2), torch.randn(12, 3)), batch_size=6)
    with pytest.raises(ValueError, match=r"targets of shape \(6, 3\).*outputs of shape \(6, 2\)"):
        L.Trainer(**QUIET).test(SWAGModule(net, post, num_samples=2, seed=0), loader)


# ---------------------------------------------------------------------- regression with a noise model


def _hetero_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))  # (mean, log-variance)


def _explicit_components(net, post, x, num_samples, scale, seed):
    """Per-sample (mean, variance) the independent way: load each sample, run the model, split."""
    outputs = _explicit_outputs(net, post, x, num_samples, scale, seed)  # [S, B, 2]
    return outputs[..., 0], outputs[..., 1].exp()


def test_heteroscedastic_bma_is_the_gaussian_mixture_of_the_samples() -> None:
    net = _hetero_net()
    post = _posterior_for(net, snapshots=8, max_rank=5)
    x = torch.linspace(-3, 3, 11).unsqueeze(1)
    out = SWAGModule(net, post, num_samples=7, seed=2, noise="heteroscedastic", return_samples=True)(x)
    means, variances = _explicit_components(net, post, x, 7, 0.5, 2)
    # law of total variance, written out
    mixture_mean = means.mean(0)
    epistemic = ((means - mixture_mean) ** 2).mean(0)
    aleatoric = variances.mean(0)
    torch.testing.assert_close(out["mean"], mixture_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["epistemic_std"], epistemic.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["aleatoric_std"], aleatoric.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["std"], (epistemic + aleatoric).sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["samples"], means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["sample_variances"], variances, rtol=1e-5, atol=1e-6)
    # an output_transform returning (mean, variance) is the same model
    pair = SWAGModule(
        net,
        post,
        num_samples=7,
        seed=2,
        noise="heteroscedastic",
        output_transform=lambda o: (o[..., 0], o[..., 1].exp()),
    )(x)
    for key in ("mean", "std", "epistemic_std", "aleatoric_std"):
        torch.testing.assert_close(pair[key], out[key], rtol=1e-5, atol=1e-6)


def test_homoscedastic_noise_adds_sigma_squared_to_the_spread() -> None:
    net = _regressor()
    post = _posterior_for(net)
    x = torch.randn(5, 2)
    plain = SWAGModule(net, post, num_samples=6, seed=1)(x)
    noisy = SWAGModule(net, post, num_samples=6, seed=1, noise=0.3)(x)
    torch.testing.assert_close(noisy["mean"], plain["mean"])
    torch.testing.assert_close(noisy["epistemic_std"], plain["std"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(noisy["aleatoric_std"], torch.full_like(plain["std"], 0.3))
    torch.testing.assert_close(noisy["std"], (plain["std"] ** 2 + 0.09).sqrt(), rtol=1e-4, atol=1e-6)


def test_fit_noise_is_the_maximum_likelihood_sigma_of_the_mixture() -> None:
    from lightning_swag import metrics

    net = _regressor()
    post = _posterior_for(net)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 2, generator=g)
    y = net(x).detach() + 0.4 * torch.randn(60, 2, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    bma = SWAGModule(net, post, num_samples=9, seed=4)
    sigma = bma.fit_noise(loader)
    assert bma.noise == sigma
    means = _explicit_outputs(net, post, x, 9, 0.5, 4)  # [S, 60, 2]
    expected = metrics.fit_gaussian_noise(means, y)
    assert sigma == pytest.approx(expected, rel=1e-4)
    # the likelihood really is largest there
    nll_at = [float(metrics.gaussian_mixture_nll(means, (sigma * f) ** 2, y)) for f in (0.9, 1.0, 1.1)]
    assert nll_at[1] < min(nll_at[0], nll_at[2])
    with pytest.raises(ValueError, match="heteroscedastic"):
        SWAGModule(_hetero_net(), _posterior_for(_hetero_net()), noise="heteroscedastic").fit_noise(loader)


def test_tune_scale_for_regression_scores_the_mixture_nll() -> None:
    from lightning_swag import metrics

    net = _hetero_net()
    post = _posterior_for(net, snapshots=8)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(50, 1, generator=g) * 6 - 3
    y = torch.sin(x).squeeze(1) + 0.2 * torch.randn(50, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    bma = SWAGModule(net, post, num_samples=8, seed=3, noise="heteroscedastic")
    scores = bma.tune_scale(loader, scales=[0.0, 0.5, 2.0])
    for scale, score in scores.items():
        means, variances = _explicit_components(net, post, x, 8, scale, 3)
        expected = metrics.gaussian_mixture_nll(means.squeeze(-1), variances.squeeze(-1), y)
        assert score == pytest.approx(float(expected), rel=1e-5)
    assert bma.scale == min(scores, key=scores.get)


def test_trainer_test_reports_the_mixture_metrics() -> None:
    from lightning_swag import metrics

    net = _hetero_net()
    post = _posterior_for(net, snapshots=8)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(70, 1, generator=g) * 6 - 3
    y = torch.sin(x) + 0.3 * torch.randn(70, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    logged = L.Trainer(**QUIET).test(
        SWAGModule(net, post, num_samples=6, seed=8, noise="heteroscedastic"), loader
    )[0]
    means, variances = _explicit_components(net, post, x, 6, 0.5, 8)
    expected = metrics.regression_metrics(means, variances, y.squeeze(1))
    assert set(logged) == {f"test_{k}" for k in expected}
    for key, value in expected.items():
        assert logged[f"test_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan"), "homoscedastic", True])
def test_bad_noise_models_are_refused(noise) -> None:
    net = _regressor()
    with pytest.raises(ValueError, match="noise"):
        SWAGModule(net, _posterior_for(net), noise=noise)


def test_a_noise_model_needs_regression() -> None:
    net = _classifier()
    with pytest.raises(ValueError, match="noise model for regression"):
        SWAGModule(net, _posterior_for(net), task="classification", noise=0.5)


def test_tune_scale_gives_an_overflowing_candidate_the_worst_score() -> None:
    net = _hetero_net()
    post = _posterior_for(net, snapshots=8)
    x = torch.linspace(-3, 3, 20).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.sin(x).squeeze(1)), batch_size=10)
    bma = SWAGModule(net, post, num_samples=4, seed=1, noise="heteroscedastic")
    with pytest.warns(UserWarning, match="edge"):
        scores = bma.tune_scale(loader, scales=[0.5, 1.0, 1e30])  # exp(log-variance) overflows at 1e30
    assert scores[1e30] == float("inf") and bma.scale in (0.5, 1.0)
