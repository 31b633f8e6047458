"""The weight average: its rates, one exact update, a run that evaluates and saves it; lookahead."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cifar_onecycle import Recipe, load_cifar10, train
from cifar_onecycle.checkpoint import load_checkpoint
from cifar_onecycle.ema import WeightEMA
from cifar_onecycle.evaluation import evaluate
from cifar_onecycle.run_setup import RunSetup
from test_train import TINY


def test_rates_per_step_with_warm_up():
    ema = WeightEMA(torch.nn.Linear(2, 2), decay=0.99, every=5)
    assert ema.rate(5, 10002) == pytest.approx(2 / 11)          # first update: the warm-up caps it
    assert ema.rate(2000, 10002) == pytest.approx(0.99 ** 5)     # 400 updates in: 0.99 a step, 5 steps
    assert ema.rate(10002, 10002) == pytest.approx(0.99 ** 2)    # a final update 2 steps after the last
    assert ema.rate(7, 10002) == pytest.approx(3 / 12)
    with pytest.raises(ValueError):
        WeightEMA(torch.nn.Linear(2, 2), decay=1.0)


def test_one_update_is_the_weighted_mean_and_counters_are_copied():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, decay=0.5, every=2)
    old = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # moves the BatchNorm statistics and its batch counter
    assert not ema.update(model, 3, 5)  # not a multiple of every: nothing changes
    assert all(torch.equal(old[k], v) for k, v in ema.model.state_dict().items())
    assert ema.update(model, 4, 5)
    keep = min(0.5 ** 2, 3 / 12)
    for k, v in ema.model.state_dict().items():
        new = model.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, keep * old[k] + (1 - keep) * new)
        else:
            assert torch.equal(v, new) and int(v) == 1
    assert ema.update(model, 5, 5)  # the last step always updates
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_lookahead_ramps_its_rate_and_writes_the_average_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, decay=0.95, every=5, lookahead=True)
    assert ema.rate(5, 100) == pytest.approx(0.95 ** 5 * 0.05 ** 3)  # barely holds back early on
    assert ema.rate(100, 100) == pytest.approx(0.95 ** 5)            # airbench's 0.95**5 at the end, no warm-up cap
    assert ema.rate(98, 98) == pytest.approx(0.95 ** 3)              # a final update 3 steps after the last
    weights = list(model.parameters())
    old = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))
    new = {k: v.clone() for k, v in model.state_dict().items()}
    assert not ema.update(model, 7, 10)
    assert all(torch.equal(new[k], v) for k, v in model.state_dict().items())  # untouched between updates
    assert ema.update(model, 10, 10)
    keep = 0.95 ** 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema.model.state_dict()[k])  # the trained model is the average now
        if v.is_floating_point():
            torch.testing.assert_close(v, keep * old[k] + (1 - keep) * new[k])
        else:
            assert int(v) == 1
    assert list(model.parameters()) == weights and all(p.requires_grad for p in weights)  # in place


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import write_cifar

    root = tmp_path_factory.mktemp("ema")
    data_dir = write_cifar(root / "data").parent
    data = load_cifar10(data_dir, download=False)
    plain = train(Recipe(**TINY), data=data, progress=False)
    # A vanishing decay makes the average the trained weights themselves, provided the final
    # step (8, not a multiple of 5) updates it: the plumbing is checked against a run without it.
    copy = train(Recipe(**TINY, ema_decay=1e-9, ema_every=5), data=data, progress=False)
    # Which weights each run's evaluations score (``average``: the weight average's), by run.
    averages: dict[str, list[bool]] = {"averaged": [], "lookahead": []}
    original = RunSetup.evaluate

    def evaluate_spied(run: str):
        def evaluate(self, average=True, **kwargs):
            averages[run].append(average)
            return original(self, average, **kwargs)
        return evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunSetup, "evaluate", evaluate_spied("averaged"))
        averaged = train(Recipe(**TINY, ema_decay=0.9, ema_every=2, tta=True), data=data, out=root / "run",
                         progress=False, report=False)
        # 4 steps an epoch: lookahead's first update is at the first epoch's end
        mp.setattr(RunSetup, "evaluate", evaluate_spied("lookahead"))
        lookahead = train(Recipe(**TINY, ema_decay=0.9, ema_every=4, ema_lookahead=True), data=data,
                          out=root / "lookahead", progress=False, report=False, keep_checkpoint=True)
    return data, plain, copy, averaged, root / "run", lookahead, averages


@pytest.mark.slow
def test_vanishing_decay_gives_the_trained_weights(runs):
    _, plain, copy, _, _, _, _ = runs
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(copy.model.state_dict()[k], v, rtol=0, atol=1e-6)
    assert copy.summary["final_test_acc_without_ema"] == plain.final_test_acc
    assert plain.summary["final_test_acc_without_ema"] is None


@pytest.mark.slow
def test_the_average_is_what_the_run_evaluates_and_saves(runs):
    data, plain, _, averaged, run, _, _ = runs
    # The same seed trains the same weights; the average is another model.
    assert [h.train_loss for h in averaged.history] == [h.train_loss for h in plain.history]
    assert any(not torch.equal(averaged.model.state_dict()[k], v) for k, v in plain.model.state_dict().items()
               if v.is_floating_point())
    saved = load_file(run / "model.safetensors")
    assert all(torch.equal(saved[k], v.contiguous()) for k, v in averaged.model.state_dict().items())
    images, labels = data.test_images, data.test_labels
    loss, acc = evaluate(averaged.model, images, labels, batch_size=16)
    assert averaged.final_test_acc == acc and averaged.history[-1].test_loss == pytest.approx(loss, rel=1e-6)
    s = json.loads((run / "summary.json").read_text())
    assert s["final_test_acc_tta"] == averaged.history[-1].test_acc_tta == evaluate(
        averaged.model, images, labels, batch_size=16, tta=True)[1]
    assert s["final_test_acc_without_ema"] == plain.final_test_acc
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith(",images_per_second,test_acc_tta")
    # Without the tta switch the summary still has the TTA accuracy; the per-epoch column is left out.
    assert plain.summary["final_test_acc_tta"] == evaluate(plain.model, images, labels, batch_size=16, tta=True)[1]
    assert all(h.test_acc_tta is None for h in plain.history)


@pytest.mark.slow
def test_lookahead_trains_other_weights_and_ends_on_its_average(runs):
    _, plain, _, _, _, lookahead, averages = runs
    # A plain average leaves the training alone; lookahead changes what is trained after its first update.
    assert lookahead.history[0].train_loss == plain.history[0].train_loss
    assert lookahead.history[1].train_loss != plain.history[1].train_loss
    # The last update writes the average back: the trained weights are the delivered ones.
    checkpoint, _ = load_checkpoint(lookahead.run_dir / "checkpoint.pt")
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in checkpoint["ema"].items())
    assert lookahead.summary["final_test_acc_without_ema"] == lookahead.final_test_acc
    # ...so the run does not evaluate the trained weights apart; a plain average's run does.
    assert averages["averaged"].count(False) == 1 and False not in averages["lookahead"]
