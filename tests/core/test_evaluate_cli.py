"""Evaluation at several bit-widths (linear cached/augmented, kNN) and the command line."""

import json
import subprocess
import sys

import pytest
import torch

from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.evaluate import evaluate, knn_top1
from ssql_core.train import pretrain

TINY = dict(dataset="synthetic", width=0.0625, image_size=16, batch_size=32, max_samples=128, epochs=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    torch.set_num_threads(1)
    pretrain(PretrainConfig(method="ssql", **TINY), d)
    return d


def test_linear_rows_name_protocol_and_heads_saved(run_dir):
    rows = evaluate(EvalConfig(checkpoint=str(run_dir / "last.pt"), bits=["fp", "4w4a", "2w4a"], epochs=30, lr=1.0, calib_images=16), run_dir)
    assert [r["bits"] for r in rows] == ["fp", "4w4a", "2w4a"]
    for r in rows:
        assert r["protocol"] == "linear" and r["path"] == "cached" and r["epochs"] == 30 and 0 <= r["top1"] <= 100
    assert rows[0]["calib_images"] == 0 and rows[1]["calib_images"] == 16
    heads = torch.load(run_dir / "heads.pt", weights_only=True)
    assert set(heads["heads"]) == {"fp", "4w4a", "2w4a"} and heads["heads"]["fp"]["weight"].shape == (10, 32)
    # synthetic classes are separable: an FP linear probe is far above chance (10%)
    assert rows[0]["top1"] > 30


def test_knn_and_augmented_paths(run_dir):
    knn = evaluate(EvalConfig(checkpoint=str(run_dir / "last.pt"), bits=["8w8a"], protocol="knn", knn_k=20))
    assert knn[0]["path"] == "knn" and knn[0]["epochs"] == 0 and knn[0]["top1"] > 20
    aug = evaluate(EvalConfig(checkpoint=str(run_dir / "last.pt"), bits=["4w4a"], path="augmented", epochs=1, lr=1.0, max_samples=64))
    assert aug[0]["path"] == "augmented" and aug[0]["train_images"] == 64


def test_knn_hand_example():
    train_f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_f = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    assert knn_top1(train_f, train_y, test_f, torch.tensor([0, 1]), 2, k=1, t=0.1) == 100.0
    assert knn_top1(train_f, train_y, test_f, torch.tensor([1, 0]), 2, k=1, t=0.1) == 0.0


def test_eval_config_errors():
    with pytest.raises(ConfigError) as e:
        EvalConfig(checkpoint="x", bits=["4w4a", "9w9a"]).validate()
    assert e.value.field == "bits"
    with pytest.raises(ConfigError) as e:
        EvalConfig(checkpoint="x", protocol="svm").validate()
    assert e.value.field == "protocol"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ssql_core", *args], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_cli_pretrain_eval_table(tmp_path):
    out = tmp_path / "run"
    r = _cli("pretrain", "--method", "simsiam", "--dataset", "synthetic", "--epochs", "1", "--width", "0.0625",
             "--image-size", "16", "--batch-size", "32", "--max-samples", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2 and "[pretrain]" in r.stderr
    r = _cli("eval", "--checkpoint", str(out / "last.pt"), "--bits", "fp,4w4a", "--epochs", "2", "--lr", "1.0", "--calib-images", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "top1" in lines[0] and lines[1].split()[0] == "fp" and lines[2].split()[0] == "4w4a"


def test_cli_bad_input_says_how_to_fix(tmp_path, capsys):
    from ssql_core.cli import main

    assert main(["eval", "--checkpoint", "x.pt", "--bits", "fp,9w4a"]) == 2
    err = capsys.readouterr().err
    assert "bits" in err and "accepted" in err
    assert main(["pretrain", "--dataset", "svhn", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dataset" in err and "known" in err
    assert main(["pretrain", "--opt", "queue_size", "--out", str(tmp_path)]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
