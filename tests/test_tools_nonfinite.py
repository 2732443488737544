"""NaN/Inf data in the model tools (recalibrate, adapt, diagnose and their commands): refused by
default, naming the BN layer and the batch, with the model unchanged and nothing written; with
``nonfinite="skip"`` left out per layer by the layers' own rule (a batch whose statistics are
not finite), reported, and an error when a layer is left with no batch. Also diagnose's table,
plot and --plot path."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormError
from batchnorm.cli import main as cli_main


class Net(nn.Module):
    """``first`` sees x, ``block.second`` sees exp(x): a value of 100 is finite for the first and
    Inf (float32) for the second, so a batch can be non-finite for one layer only."""

    def __init__(self):
        super().__init__()
        self.first = nn.BatchNorm1d(4)
        self.block = nn.Sequential(OrderedDict(second=nn.BatchNorm1d(4)))
        with torch.no_grad():  # statistics that are not the defaults, to see them kept
            for bn in (self.first, self.block.second):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.num_batches_tracked.fill_(7)

    def forward(self, x):
        return self.first(x) + self.block(torch.exp(x))


def clean(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=g) for _ in range(n)]


def poisoned():
    """Batch 2 holds a NaN (non-finite for both layers), batch 3 a 100 (for block.second only)."""
    data = clean()
    data[1][3, 1] = float("nan")
    data[2][0, 2] = 100.0
    return data


def net(ours=False, layer_nonfinite=None):
    torch.manual_seed(0)
    model = Net()
    if ours:
        model = batchnorm.convert(model)
        for m in model.modules():
            if layer_nonfinite and hasattr(m, "nonfinite"):
                m.nonfinite = layer_nonfinite
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, getattr(m, "momentum", None), getattr(m, "nonfinite", None))
             for m in model.modules()])


def assert_unchanged(model, before):
    state, flags = snapshot(model)
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    for k, v in before[0].items():
        assert torch.equal(state[k], v), k


def stats(batches):
    x = torch.cat(batches).double()
    return x.mean(0), x.var(0)


# ---------------------------------------------------------------------------------------------
# recalibrate


@pytest.mark.parametrize("ours", [False, True])
@pytest.mark.parametrize("estimator", ["exact", "average"])
def test_recalibrate_refuses_nonfinite_data_by_default_and_changes_nothing(ours, estimator):
    model = net(ours)
    before = snapshot(model)
    with pytest.raises(BatchNormError, match=r"'first' on batch 2 of data"):
        batchnorm.recalibrate(model, poisoned(), progress=False, estimator=estimator)
    assert_unchanged(model, before)
    data = clean()
    data[2][0, 2] = 100.0  # only block.second's input is Inf, on batch 3
    with pytest.raises(BatchNormError, match=r"'block\.second' on batch 3 of data"):
        batchnorm.recalibrate(model, data, progress=False, estimator=estimator,
                              nonfinite="raise")
    assert_unchanged(model, before)


@pytest.mark.parametrize("ours, layer_nonfinite", [(False, None), (True, None), (True, "raise")])
@pytest.mark.parametrize("estimator", ["exact", "average"])
def test_recalibrate_skip_leaves_each_batch_out_of_the_layers_it_poisons(ours, layer_nonfinite,
                                                                          estimator):
    model = net(ours, layer_nonfinite)
    data = poisoned()
    flags = snapshot(model)[1]
    got, report = batchnorm.recalibrate(model, data, progress=False, estimator=estimator,
                                        nonfinite="skip", report=True)
    assert snapshot(got)[1] == flags  # momentum, mode and the layers' own nonfinite put back
    assert report.skipped_batches == {"first": [2], "block.second": [2, 3]}
    assert report.to_dict()["skipped_batches"] == {"first": [2], "block.second": [2, 3]}
    assert report.batches == 4 and report.nonfinite == "skip"
    kept = {"first": [data[i] for i in (0, 2, 3)],
            "block.second": [torch.exp(data[i]) for i in (0, 3)]}
    for name, batches in kept.items():
        bn = got.get_submodule(name)
        if estimator == "exact":  # the statistics of every value the layer kept
            mean, var = stats(batches)
        else:  # update_bn's average of the kept batches
            mean = torch.stack([b.double().mean(0) for b in batches]).mean(0)
            var = torch.stack([b.double().var(0) for b in batches]).mean(0)
            assert int(bn.num_batches_tracked) == len(batches)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_recalibrate_skip_warns_once_without_a_report_and_not_on_clean_data():
    with pytest.warns(RuntimeWarning, match=r"'first': batch 2; 'block\.second': batches 2, 3"):
        batchnorm.recalibrate(net(), poisoned(), progress=False, nonfinite="skip")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = batchnorm.recalibrate(net(), clean(), progress=False, nonfinite="skip",
                                          report=True)
    assert report.skipped_batches == {}


@pytest.mark.parametrize("estimator", ["exact", "average"])
def test_recalibrate_a_layer_left_without_batches_is_an_error(estimator):
    model = net()
    before = snapshot(model)
    data = clean(2)
    for b in data:
        b[0, 0] = 100.0  # Inf for block.second in every batch
    with pytest.raises(BatchNormError, match=r"'block\.second'.*all 2 batches"):
        batchnorm.recalibrate(model, data, progress=False, nonfinite="skip",
                              estimator=estimator)
    assert_unchanged(model, before)


def _rank_batches(rank):
    data = clean(2, seed=10 + rank)
    data[rank][1, rank] = float("nan") if rank == 0 else 100.0  # both layers / block.second
    return data


def _recalibrate_on_ranks(rank, world):
    out = {}
    for estimator in ("exact", "average"):
        model, report = batchnorm.recalibrate(
            net(), _rank_batches(rank), progress=False, estimator=estimator, nonfinite="skip",
            report=True, process_group=torch.distributed.group.WORLD)
        out[estimator] = {"state": dict(model.state_dict()), "skipped": report.skipped_batches}
    return out


def test_recalibrate_skip_across_ranks_equals_one_process():
    from ._dist import run_ranks, unwrap

    got = unwrap(run_ranks(_recalibrate_on_ranks, 2))
    assert got[0]["exact"]["skipped"] == {"first": [1], "block.second": [1]}
    assert got[1]["exact"]["skipped"] == {"block.second": [2]}
    for estimator in ("exact", "average"):
        want = batchnorm.recalibrate(net(), _rank_batches(0) + _rank_batches(1), progress=False,
                                     estimator=estimator, nonfinite="skip", report=True)[0]
        for rank in range(2):
            state = got[rank][estimator]["state"]
            for k, v in want.state_dict().items():  # num_batches_tracked too
                torch.testing.assert_close(state[k], v, msg=f"{estimator} rank {rank} {k}")


def test_recalibrate_refuses_a_bad_nonfinite():
    with pytest.raises(BatchNormError, match=r"nonfinite in \('raise', 'skip'\)"):
        batchnorm.recalibrate(net(), clean(), progress=False, nonfinite="update")


# ---------------------------------------------------------------------------------------------
# adapt


def test_adabn_refuses_an_inf_by_default_and_skips_it_on_request():
    model = net()
    before = snapshot(model)
    data = clean()
    data[1][2, 3] = float("inf")
    with pytest.raises(BatchNormError, match=r"'first' on batch 2 of data"):
        batchnorm.adapt(model, data, "adabn", progress=False)
    assert_unchanged(model, before)
    with pytest.warns(RuntimeWarning, match="'first': batch 2"):
        got = batchnorm.adapt(model, data, "adabn", progress=False, nonfinite="skip")
    want = batchnorm.recalibrate(copy.deepcopy(model), [data[i] for i in (0, 2, 3)],
                                 progress=False)
    for name in ("first", "block.second"):
        a, b = got.get_submodule(name), want.get_submodule(name)
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert_unchanged(model, before)


def test_tent_refuses_nonfinite_data_by_default_and_skips_the_batch_on_request():
    model = net()
    before = snapshot(model)
    data = poisoned()
    with pytest.raises(BatchNormError, match=r"'first' on batch 2 of data"):
        batchnorm.adapt(model, data, "tent", progress=False)
    with pytest.warns(RuntimeWarning, match=r"'first': batch 2; 'block\.second': batches 2, 3"):
        got = batchnorm.adapt(model, data, "tent", progress=False, nonfinite="skip")
    want = batchnorm.adapt(model, [data[0], data[3]], "tent", progress=False)
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
    assert_unchanged(model, before)
    with pytest.raises(BatchNormError, match="at least one batch"):
        batchnorm.adapt(model, [data[1], data[2]], "tent", progress=False, nonfinite="skip")


def test_tent_refuses_a_model_whose_output_is_not_finite():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.fill_(1e38)  # finite inputs to the BN, Inf logits
    for nonfinite in ("raise", "skip"):
        with pytest.raises(BatchNormError, match="a finite entropy on batch 1 of data"):
            batchnorm.adapt(model, clean(), "tent", progress=False, nonfinite=nonfinite)


# ---------------------------------------------------------------------------------------------
# diagnose


def test_diagnose_refuses_all_nan_data_and_skip_leaves_no_statistics():
    model = net().eval()
    data = [torch.full((8, 4), float("nan")) for _ in range(2)]
    with pytest.raises(BatchNormError, match=r"'first' on batch 1 of data"):
        batchnorm.diagnose(model, data, progress=False)
    with pytest.raises(BatchNormError, match=r"'first'.*all 2 batches"):
        batchnorm.diagnose(model, data, progress=False, nonfinite="skip")


def test_diagnose_skip_measures_each_layer_on_its_finite_batches():
    model = net().eval()
    before = snapshot(model)
    data = poisoned()
    got = batchnorm.diagnose(model, data, progress=False, nonfinite="skip")
    assert got.skipped_batches == {"first": [2], "block.second": [2, 3]}
    assert got.to_dict()["skipped_batches"] == got.skipped_batches
    assert got.batches == 4 and got.effect_batches == 2
    text = str(got)
    assert "left out" in text and "batches 2, 3" in text
    by = {r.name: r for r in got.layers}
    kept = {"first": [data[i] for i in (0, 2, 3)],
            "block.second": [torch.exp(data[i]) for i in (0, 3)]}
    for name, batches in kept.items():  # each layer's drift over the batches it kept
        bn = model.get_submodule(name)
        mean, var = stats(batches)
        rm, rv = bn.running_mean.double(), bn.running_var.double()
        torch.testing.assert_close(torch.tensor(by[name].shift, dtype=torch.float64),
                                   (mean - rm) / torch.sqrt(rv + bn.eps))
        torch.testing.assert_close(torch.tensor(by[name].log_ratio, dtype=torch.float64),
                                   torch.log((var + bn.eps) / (rv + bn.eps)))
    both = batchnorm.diagnose(model, [data[0], data[3]], progress=False)
    for r in both.layers:  # the effect over the batches finite for every layer
        assert by[r.name].effect == pytest.approx(r.effect, rel=1e-12)
    assert_unchanged(model, before)


def test_diagnose_nonfinite_running_statistics_drift():
    model = batchnorm.recalibrate(net(), clean(), progress=False).eval()
    assert not batchnorm.diagnose(model, clean(), progress=False).drifting
    with torch.no_grad():
        model.block.second.running_mean[1] = float("nan")
    result = batchnorm.diagnose(model, clean(), progress=False)
    assert result.drifting == ["block.second"]
    assert result.verdict != "running statistics describe this data"


def test_diagnose_table_says_what_the_columns_are():
    model = net().eval()
    text = " ".join(str(batchnorm.diagnose(model, clean(), progress=False)).split())
    assert "median |·|" in text and "worst channel, signed" in text
    # the note under the table: the effect includes drift inherited from upstream layers
    assert "effect: output change with this layer alone on its batch statistics" in text
    assert "inherited from the layers before it" in text


def test_diagnose_plot_has_a_legend_for_the_thresholds_and_colours():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    result = batchnorm.diagnose(net().eval(), clean(), progress=False)
    ax_shift, ax_effect = Figure().subplots(1, 2)
    result.plot(ax_shift, ax_effect)
    shift = [t.get_text() for t in ax_shift.get_legend().get_texts()]
    assert any("threshold" in t and "1" in t for t in shift)
    assert any("threshold" in t and "log 2" in t for t in shift)
    assert ax_effect.get_legend() is not None
    effect = [t.get_text() for t in ax_effect.get_legend().get_texts()]
    assert "drifts" in effect and "does not drift" in effect
    assert any("5%" in t for t in effect)


# ---------------------------------------------------------------------------------------------
# the commands


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(OrderedDict(block=nn.Sequential(OrderedDict(
        lin=nn.Linear(4, 4), bn=nn.BatchNorm1d(4)))))  # PyTorch modules only: loads anywhere
    torch.save(model, tmp_path / "model.pt")
    data = torch.cat(clean())
    torch.save(data, tmp_path / "clean.pt")
    data[9, 1] = float("nan")  # batch 2 in batches of 8
    torch.save(data, tmp_path / "nan.pt")
    return tmp_path, model


def test_cli_recalibrate_refuses_nonfinite_data_and_writes_nothing(files, capsys):
    d, model = files
    status = cli_main(["recalibrate", "model.pt", "--data", "nan.pt", "--batch-size", "8",
                       "-o", "out.pt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "'block.bn' on batch 2 of data" in err[0] and "--nonfinite skip" in err[0]
    assert not (d / "out.pt").exists()


def test_cli_recalibrate_skip_reports_the_batches_left_out(files, capsys):
    d, model = files
    assert cli_main(["recalibrate", "model.pt", "--data", "nan.pt", "--batch-size", "8",
                     "-o", "out.pt", "--nonfinite", "skip"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "left out batch 2 for block.bn (NaN/Inf in its input)" in out
    assert (d / "out.pt").exists()
    assert cli_main(["recalibrate", "model.pt", "--data", "nan.pt", "--batch-size", "8",
                     "-o", "out2.pt", "--nonfinite", "skip", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_batches"] == {"block.bn": [2]} and report["nonfinite"] == "skip"
    bn = torch.load(d / "out2.pt", weights_only=False).block.bn
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_cli_diagnose_refuses_nonfinite_data_and_skips_on_request(files, capsys):
    d, _ = files
    status = cli_main(["diagnose", "model.pt", "--data", "nan.pt", "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "'block.bn' on batch 2" in err[0], err
    assert cli_main(["diagnose", "model.pt", "--data", "nan.pt", "--batch-size", "8",
                     "--nonfinite", "skip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_batches"] == {"block.bn": [2]}


def test_cli_diagnose_plot_into_a_missing_folder_names_plot(files, capsys):
    pytest.importorskip("matplotlib")
    assert cli_main(["diagnose", "model.pt", "--data", "clean.pt", "--plot", "nodir/p.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0] and "'nodir'" in err[0], err
    assert "-o" not in err[0].replace("--plot", "")
    assert not (files[0] / "nodir").exists()

