import json

import pytest
import torch

import metrics


def test_metrics_logger_writes_jsonl(tmp_path):
    log = metrics.MetricsLogger(str(tmp_path))
    log.log({"loss": torch.tensor(0.5), "n": 3}, step=1)
    log.log({"loss": 0.25}, step=2)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5, "n": 3}, {"step": 2, "loss": 0.25}]


def test_metrics_logger_mirrors_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = metrics.MetricsLogger(str(tmp_path), {"lr": 1e-3}, wandb_project="nano-r1-test", wandb_mode="offline")
    log.log({"loss": 1.5}, step=1)
    log.finish()
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.5}'
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())  # the run was recorded locally
