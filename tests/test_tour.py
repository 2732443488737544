"""The tour: ``batchnorm demo --quick`` and ``batchnorm experiment figure1``, run in-process.

The demo runs once per module (fixture) and every test reads its folder; a second run with the
same seed checks determinism. The data loaders are checked on small generated files.
"""
from __future__ import annotations

import gzip
import json
import re
import struct
from html import escape as html_escape

import numpy as np
import pytest
import torch

from batchnorm import BatchNormError
from batchnorm.cli import main
from batchnorm.tour import data as tour_data
from batchnorm.tour.report import strip_timing

# one worker runs this module, so the demo fixture (a whole tour run) is built once per session
pytestmark = pytest.mark.xdist_group("tour")

SECTIONS = {
    "s1_purpose": "1 · What BN is for",
    "s2_compute": "2 · How BN computes",
    "s3_parameters": "3 · Parameters",
    "s4_modes": "4 · Training vs evaluation",
    "s5_placement": "5 · Where BN goes",
    "s6_conv_bias": "6 · What BN does to the conv before it",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seed", "0", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def _check_folder(out, html: str, results: dict) -> None:
    names = _images(html)
    assert names and sorted(names) == sorted(results["figures"])
    for name in names:
        assert "/" not in name and ":" not in name  # relative, beside index.html
        from PIL import Image

        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    # self-contained: no external stylesheets, scripts or images
    assert "<script" not in html and "<link" not in html and "http" not in html


def test_demo_html_has_every_section_and_its_plots(demo):
    out, results = demo
    html = (out / "index.html").read_text()
    for key, title in SECTIONS.items():
        assert f'id="{key}"' in html and title in html
        assert key in results
    _check_folder(out, html, results)


def test_demo_proof_table_includes_our_layer_and_agrees(demo):
    proof = demo[1]["s4_modes"]["proof"]
    assert proof["implementations"] == ["lesson loop", "reference", "torch", "batchnorm"]
    assert [(r["mode"], r["quantity"]) for r in proof["rows"]] == [
        ("train", "output"), ("train", "running_mean"), ("train", "running_var"),
        ("eval", "output")]
    for row in proof["rows"]:
        values = np.array(list(row["values"].values()))
        assert values.shape == (4, 16 if row["quantity"] == "output" else 2)
        assert np.abs(values - values[0]).max() == pytest.approx(row["max_diff"], abs=0)
        assert row["max_diff"] < 1e-5
    # the input is the lesson's (2, 2, 2, 2) standard normal, seed 0
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.array(proof["input"], dtype=np.float32), x)


def test_demo_train_vs_eval_numbers(demo):
    s4 = demo[1]["s4_modes"]
    one = s4["one_step"]
    # running stats after one step from (0, 1), recomputed here from the batch statistics
    np.testing.assert_allclose(one["running_mean"], 0.1 * np.array(one["batch_mean"]), rtol=1e-6)
    np.testing.assert_allclose(one["running_var"],
                               0.9 + 0.1 * np.array(one["batch_var_unbiased"]), rtol=1e-6)
    assert one["max_train_eval_diff"] > 0.1 and one["eval_by_hand_diff"] < 1e-5
    rep = s4["repeated_steps"]
    assert rep["closed_form_mean_error"] < 1e-5
    assert rep["max_diff"][-1] == pytest.approx(rep["predicted_limit"], rel=1e-2)
    real = s4["real_data"]
    assert real["logit_spread_eval"] == 0.0 and real["logit_spread_train"] > 0.0


def test_worked_channel_against_numpy_and_pytorch(tmp_path):
    """Section 2 run on a network with known weights: its numbers against NumPy's own mean and
    variance of the same conv output, and its running update against PyTorch's BatchNorm2d (not
    against each other: the demo's results.json cannot judge itself)."""
    from batchnorm.tour import compute
    from batchnorm.tour.context import Context, Settings
    from batchnorm.tour.data import load
    from batchnorm.tour.nets import SmallCNN

    torch.manual_seed(3)
    model = SmallCNN("conv-bn-relu")
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    data = load(seed=0)
    ctx = Context(Settings.make(0, quick=True), data, tmp_path, progress=None,
                  models={"conv-bn-relu": model})
    got = compute.run(ctx).results
    images = torch.from_numpy(data.x_test[:compute.BATCH])
    with torch.no_grad():
        feature = model[0](images)
    x = feature[:, compute.CHANNEL].double().numpy()
    assert got["m"] == x.size
    np.testing.assert_allclose(got["mean"], np.mean(x), rtol=1e-12)
    np.testing.assert_allclose(got["var_biased"], np.var(x), rtol=1e-12)
    np.testing.assert_allclose(got["var_unbiased"], np.var(x, ddof=1), rtol=1e-12)
    bn = torch.nn.BatchNorm2d(16).double()
    bn.load_state_dict(model[1].state_dict())
    with torch.no_grad():
        y = bn.train()(feature.double())[:, compute.CHANNEL].numpy()
    c = compute.CHANNEL
    np.testing.assert_allclose(got["running_mean_after"], bn.running_mean[c].item(), rtol=1e-7)
    np.testing.assert_allclose(got["running_var_after"], bn.running_var[c].item(), rtol=1e-6)
    for e in got["examples"]:
        np.testing.assert_allclose(e["y"], y.reshape(-1)[e["index"]], rtol=1e-9, atol=1e-9)


def test_demo_worked_channel_is_consistent(demo):
    s2 = demo[1]["s2_compute"]
    for e in s2["examples"]:
        xhat = (e["x"] - s2["mean"]) / np.sqrt(s2["var_biased"] + s2["eps"])
        assert e["x_hat"] == pytest.approx(xhat)
        assert e["y"] == pytest.approx(s2["gamma"] * xhat + s2["beta"])
    assert max(s2["max_diff_vs_layer"].values()) < 1e-5


def test_demo_parameters_from_inspect(demo):
    s3 = demo[1]["s3_parameters"]
    assert s3["bn_learnable_params"] == 32 == s3["bn_learnable_params_counted"]
    assert s3["inspect"]["totals"]["bn_params"] == 32
    assert set(s3["bn_buffers"]) == {"running_mean", "running_var", "num_batches_tracked"}
    assert [r["learnable"] for r in s3["layers"]] == [3 * 16 * 9 + 16, 32, 0]


def test_demo_conv_bias_strip_and_fold(demo):
    s6 = demo[1]["s6_conv_bias"]
    assert s6["train_effect"]["bn_output"] < 1e-5
    assert s6["train_effect"]["network_output"] < 1e-5
    grads = s6["gradients"]
    assert grads["bias_before_bn"] < 1e-5 < grads["weight_before_bn"]
    assert s6["eval_shift_without_strip"] > 1e-3  # running_mean never saw the bias
    strip = s6["strip_bias"]
    assert strip["parameters_saved"] == 16
    assert strip["parameters_before"] - strip["parameters_after"] == 16
    assert strip["eval_output_max_diff"] < 1e-5
    fold = s6["fold"]
    assert fold["report"]["folded"] == 3 and fold["bn_layers_after"] == 0
    assert fold["max_error"] < 1e-5 and fold["rel_error"] < 1e-5
    assert fold["measured_max_error"] == pytest.approx(fold["max_error"], rel=1e-6)
    assert all(layer["rel_error"] < 1e-5 for layer in fold["report"]["layers"])
    assert fold["same_predictions"] == fold["test_images"]
    assert fold["timing"]["latency_before_ms"] > 0 and fold["timing"]["latency_after_ms"] > 0


def test_demo_placements_and_curves(demo):
    r = demo[1]
    s1, s5 = r["s1_purpose"], r["s5_placement"]["placements"]
    steps = r["settings"]["steps"]
    for run in (s1["with_bn"], s1["without_bn"]):
        assert len(run["loss"]) == steps and run["eval_steps"] == list(range(steps + 1))
        assert len(run["percentiles"]["p50"]) == steps + 1
        assert all(a <= b <= c for a, b, c in zip(*run["percentiles"].values()))
    assert [len(v) for v in s1["lr_sweep"].values()] == [3, 3]
    codes = {p: {f["code"] for f in v["inspect"]["findings"]} for p, v in s5.items()}
    assert "act-before-bn" in codes["conv-relu-bn"] and "conv-bn-act" in codes["conv-bn-relu"]
    assert s5["none"]["inspect"]["totals"]["bn_layers"] == 0
    assert s5["conv-bn-relu"]["final_test_acc"] == s1["with_bn"]["final_test_acc"]


def test_demo_is_deterministic(demo, tmp_path):
    assert main(["demo", "--quick", "--seed", "0", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert strip_timing(again) == strip_timing(demo[1])
    assert "timing" in demo[1] and "timing" in demo[1]["s6_conv_bias"]["fold"]


def test_figure1_runs_and_judges_its_claims(tmp_path):
    assert main(["experiment", "figure1", "--steps", "60", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    html = (tmp_path / "index.html").read_text()
    _check_folder(tmp_path, html, results)
    assert set(results["claims"]) == {"faster", "higher_accuracy", "stable"}
    m = results["measured"]
    for claim in results["claims"].values():
        assert isinstance(claim["holds"], bool) and html_escape(claim["claim"]) in html
    for key in ("bn", "plain"):
        curve = results["curves"][key]
        assert curve["eval_steps"][-1] == 60 and len(curve["loss"]) == 60
    # the accuracies the claim is judged on, recomputed outside the experiment's code: the same
    # seeded networks retrained, then argmax over the test images by hand
    from batchnorm.tour import figure1
    from batchnorm.tour.training import MAX_TEST, deterministic, train

    config = figure1.Config(steps=60)
    dataset = tour_data.load(None, seed=0)
    n = min(len(dataset.y_test), MAX_TEST)
    x, y = torch.from_numpy(dataset.x_test[:n]), torch.from_numpy(dataset.y_test[:n])
    accuracy = {}
    with deterministic():
        for key in ("bn", "plain"):
            model = figure1.build(key == "bn", dataset, config)
            train(model, dataset, name=key, steps=60, lr=config.lr, seed=0,
                  batch_size=config.batch_size, eval_every=config.eval_every,
                  probe_unit=config.probe_unit, momentum=0.0)
            with torch.no_grad():
                accuracy[key] = (model.eval()(x).argmax(1) == y).double().mean().item()
            assert m[key]["final_test_acc"] == pytest.approx(accuracy[key], abs=1e-6)
    assert results["claims"]["higher_accuracy"]["holds"] == (accuracy["bn"] > accuracy["plain"])


@pytest.mark.parametrize("bn, plain, faster, higher, stable", [
    # reached 90% first; higher final accuracy; its percentiles moved less relative to spread
    ((10, 0.8, 0.95, 0.1), (20, 0.9, 0.90, 0.5), True, True, True),
    # the same step reached: the higher mean accuracy breaks the tie
    ((10, 0.8, 0.95, 0.1), (10, 0.7, 0.95, 0.1), True, False, False),
    ((10, 0.7, 0.95, 0.1), (10, 0.8, 0.96, 0.1), False, False, False),
    # never reached beats nothing; reached beats never
    ((None, 0.5, 0.5, None), (None, 0.6, 0.4, 0.2), False, True, False),
    ((30, 0.5, 0.9, 0.3), (None, 0.6, 0.4, 0.2), True, True, False),
])
def test_figure1_verdicts_from_hand_written_numbers(bn, plain, faster, higher, stable):
    from batchnorm.tour.figure1 import judge

    def measured(steps, mean_acc, final, shift):
        return {"steps_to_target": steps, "mean_test_acc": mean_acc, "final_test_acc": final,
                "relative_shift": shift}

    verdicts = judge({"bn": measured(*bn), "plain": measured(*plain)})
    assert (verdicts["faster"]["holds"], verdicts["higher_accuracy"]["holds"],
            verdicts["stable"]["holds"]) == (faster, higher, stable)


def test_figure1_measure_against_a_hand_made_curve():
    from batchnorm.tour.figure1 import Config, measure
    from batchnorm.tour.training import Curves

    config = Config(steps=100, evals=4, target=0.9)  # evaluations at 0, 25, 50, 75, 100
    c = Curves(name="bn", lr=0.5, loss=[1.0] * 100, eval_steps=[0, 25, 50, 75, 100],
               test_acc=[0.1, 0.5, 0.92, 0.91, 0.95],
               percentiles=[[-9.0, 0.0, 9.0], [-1.0, 0.0, 1.0], [-1.5, 0.5, 1.0],
                            [-1.0, 0.25, 1.5], [-1.0, 0.0, 1.0]])
    m = measure(c, config)
    assert m["steps_to_target"] == 50 and m["final_test_acc"] == 0.95
    assert m["mean_test_acc"] == pytest.approx((0.5 + 0.92 + 0.91 + 0.95) / 4)
    # from step 10 on (the first tenth left out): p15 moved 0.5, p50 0.5, p85 0.5; spread 2
    assert m["percentile_moved_after_first_tenth"] == {"p15": 0.5, "p50": 0.5, "p85": 0.5}
    assert m["final_spread_p85_minus_p15"] == 2.0 and m["relative_shift"] == 0.25


def test_shift_experiment_shows_its_claims_and_is_deterministic(tmp_path):
    """Measured at the default 300 steps: clean 0.996; contrast 0.16 as is, 0.996 after AdaBN
    and TENT; brightness 0.25 -> 0.998; inversion (the control) 0.19 -> 0.14-0.15."""
    assert main(["experiment", "shift", "--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    html = (tmp_path / "a" / "index.html").read_text()
    _check_folder(tmp_path / "a", html, results)
    rows, claims = results["rows"], results["claims"]
    assert set(rows) == {"clean", "contrast", "brightness", "inversion"}
    assert all(claim["holds"] for claim in claims.values()), claims
    for name in ("contrast", "brightness"):
        assert rows[name]["eval"] < 0.5 < 0.9 < rows[name]["adabn"]
        assert rows[name]["drifting"]
    assert rows["inversion"]["adabn"] < 0.5  # the control: BN statistics cannot undo a flip
    assert not rows["clean"]["drifting"]
    for claim in claims.values():
        assert html_escape(claim["claim"]) in html
    # the same seed, the same numbers
    assert main(["experiment", "shift", "--steps", "30", "--out", str(tmp_path / "b")]) == 0
    assert main(["experiment", "shift", "--steps", "30", "--out", str(tmp_path / "c")]) == 0
    b, c = (strip_timing(json.loads((tmp_path / d / "results.json").read_text()))
            for d in ("b", "c"))
    assert b == c


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 8, 8)))
    assert main(["demo", "--quick", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected arrays 'x' and 'y'" in err[0]
    assert main(["experiment", "figure1", "--steps", "3", "--out", str(tmp_path / "o")]) == 2


# --------------------------------------------------------------------------- data loaders


def _idx(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_loads_train_and_test(tmp_path, compress):
    rng = np.random.default_rng(1)
    def split(n):
        return (rng.integers(0, 256, (n, 6, 5), dtype=np.uint8),
                rng.integers(0, 10, n, dtype=np.uint8))

    files = {"train": split(12), "t10k": split(5)}
    suffix = ".gz" if compress else ""
    for prefix, (x, y) in files.items():
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            raw = _idx(arr)
            data = gzip.compress(raw) if compress else raw
            (tmp_path / f"{prefix}-{kind}-ubyte{suffix}").write_bytes(data)
    ds = tour_data.load(tmp_path)
    (x, y), (xt, yt) = files["train"], files["t10k"]
    scale = x.max()
    np.testing.assert_allclose(ds.x_train[:, 0], x / scale, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[:, 0], xt / scale, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(ds.y_test, yt)
    # one images file: its labels are found by name, and the split is seeded
    single = tour_data.load(tmp_path / f"train-images-idx3-ubyte{suffix}", seed=3)
    assert len(single.y_train) + len(single.y_test) == 12 and len(single.y_test) == 3
    again = tour_data.load(tmp_path / f"train-images-idx3-ubyte{suffix}", seed=3)
    np.testing.assert_array_equal(single.x_test, again.x_test)


def test_read_idx_float_and_bad_files(tmp_path):
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    (tmp_path / "f.idx").write_bytes(_idx(arr))
    np.testing.assert_array_equal(tour_data.read_idx(tmp_path / "f.idx"), arr)
    (tmp_path / "short.idx").write_bytes(_idx(arr)[:-1])
    with pytest.raises(BatchNormError, match="expected 24 data bytes"):
        tour_data.read_idx(tmp_path / "short.idx")
    (tmp_path / "junk.idx").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(BatchNormError, match="expected an IDX file"):
        tour_data.read_idx(tmp_path / "junk.idx")


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.random((20, 1, 7, 7)), rng.integers(0, 3, 20)
    np.savez(tmp_path / "d.npz", x=x * 5, y=y)
    ds = tour_data.load(tmp_path / "d.npz", seed=0)
    assert ds.image_shape == (1, 7, 7) and ds.num_classes == 3
    assert len(ds.y_test) == 5 and len(ds.y_train) == 15
    merged = np.concatenate([ds.x_train, ds.x_test])[:, 0]
    order = np.random.default_rng(0).permutation(20)
    want = (x[np.r_[order[5:], order[:5]], 0] * 5) / (x[order[5:]] * 5).max()
    np.testing.assert_allclose(merged, want, rtol=1e-6)
    np.savez(tmp_path / "t.npz", x=x[:, 0], y=y, x_test=x[:4, 0], y_test=y[:4])
    ds = tour_data.load(tmp_path / "t.npz")
    assert len(ds.y_test) == 4 and len(ds.y_train) == 20
    np.savez(tmp_path / "bad.npz", x=x, y=y[:5])
    with pytest.raises(BatchNormError, match=r"expected labels of shape \(20,\)"):
        tour_data.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        tour_data.load(tmp_path / "missing.npz")


def test_digits_split_is_seeded():
    a, b, c = tour_data.load(seed=0), tour_data.load(seed=0), tour_data.load(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    assert a.describe() == {"source": "scikit-learn digits (load_digits)", "train": 1348,
                            "test": 449, "image_shape": [1, 8, 8], "classes": 10,
                            "pooled_from": None}
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0


def test_downsample_pools_large_images():
    rng = np.random.default_rng(4)
    x = rng.random((6, 1, 29, 28)).astype(np.float32)
    ds = tour_data.Dataset(x, np.arange(6), x[:2], np.arange(2), "t", 6)
    small = tour_data.downsample(ds, 16)
    assert small.image_shape == (1, 14, 14) and small.pooled_from == (29, 28)
    want = x[:, :, :28, :28].reshape(6, 1, 14, 2, 14, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(small.x_train, want, rtol=1e-6)
    assert tour_data.downsample(tour_data.load(), 16).pooled_from is None  # 8x8 stays


def test_strip_timing_removes_only_timing():
    value = {"a": 1, "timing": {"x": 2}, "b": [{"timing": 3, "c": 4}]}
    assert strip_timing(value) == {"a": 1, "b": [{"c": 4}]}


def test_figure1_on_idx_files(tmp_path):
    rng = np.random.default_rng(5)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 120), ("t10k", 40)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.random((n, 28, 28)) * 40 + y[:, None, None] * 20).astype(np.uint8)
        (data / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (data / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
    out = tmp_path / "out"
    argv = ["experiment", "figure1", "--steps", "20", "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["image_shape"] == [1, 28, 28]
    assert results["data"]["train"] == 120 and results["data"]["test"] == 40
    assert results["data"]["source"].startswith("MNIST IDX files")


def test_quick_demo_says_it_is_too_short_instead_of_never(demo):
    out, results = demo
    html = (out / "index.html").read_text()
    assert "Quick run (--quick)" in html and "quick (too short to show the training claims)" in html
    section1 = html.split('<section id="s1_purpose">')[1].split("</section>")[0]
    assert "never" not in section1 and "(quick run)" in section1
    assert results["settings"]["quick"] is True
