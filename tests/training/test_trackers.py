"""MLflow and W&B (offline) write a run with the loss curve, for one training command and for each
iteration of a loop; TensorBoard stays the default; an unknown tracker is a clear error.

These run the real trackers (the `mlflow` and `wandb` packages of the dev extra), nothing mocked:
the loss curve is read back from MLflow's store with its client and from W&B's offline run file."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from noisepo.cli import main

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch):
    """As on a machine with no tracking server and no W&B login: the defaults must write locally."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def write_pairs(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": "a" * (3 + i % 3), "rejected": "b" * (3 + i % 3)})
                            + "\n" for i in range(n)))
    return path


def mlflow_losses(db: Path) -> list[list[tuple[int, float]]]:
    """The `loss` history of every run in an MLflow store, oldest run first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time ASC"])
    return [[(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] for run in runs]


def wandb_records(path: Path):
    """The records of a W&B offline run file. Its format is LevelDB's log: a 7-byte header (':W&B',
    magic, version), then 32 KiB blocks of chunks [crc32: 4][length: 2][type: 1][data], type 1 a whole
    record, 2/3/4 its first/middle/last part. wandb ships no Python reader (its core is in Go)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_losses(folder: Path) -> list[list[tuple[int, float]]]:
    """The train/loss curve of every offline run under `folder`/wandb, oldest first."""
    curves = []
    for run_file in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        curve = []
        for record in wandb_records(run_file):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if "train/loss" in items:
                    curve.append((items["train/global_step"], items["train/loss"]))
        curves.append(curve)
    return curves


def test_train_writes_the_loss_curve_to_mlflow_and_wandb_offline(micro_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    output = tmp_path / "run"
    status = main(["train", "--model", micro_model_dir, "--data", str(data), "--output", str(output),
                   "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-2",
                   "--report-to", "mlflow,wandb"])
    assert status in (0, None)
    logged = [entry["loss"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    (mlflow_curve,) = mlflow_losses(output / "mlflow.db")
    (wandb_curve,) = wandb_losses(output)
    assert [step for step, _ in mlflow_curve] == [step for step, _ in wandb_curve] == [1, 2, 3, 4]
    assert [loss for _, loss in mlflow_curve] == pytest.approx(logged)
    assert [loss for _, loss in wandb_curve] == pytest.approx(logged)
    assert logged[-1] < logged[0]  # a curve, not four copies of ln 2
    assert not (output / "logs").exists()  # TensorBoard only when named


def test_each_iteration_of_a_loop_is_a_run_of_its_own(micro_model_dir, tmp_path):
    from noisepo.pipelines.common import LossOptions, train_pairs
    from noisepo.training.config import OptimOptions

    records = [{"id": i, "prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(8)]
    options = OptimOptions(learning_rate=5e-3, max_steps=3, batch_size=4, warmup_ratio=0.0, logging_steps=1,
                           report_to=["wandb", "mlflow", "tensorboard"])
    for k in range(2):
        train_pairs(records, init_model=micro_model_dir, output=tmp_path / f"iter_{k}", options=options,
                    loss=LossOptions("dpo", beta=0.5), progress=False)
    for k in range(2):
        folder = tmp_path / f"iter_{k}"
        assert [[s for s, _ in c] for c in wandb_losses(folder)] == [[1, 2, 3]]
        assert [[s for s, _ in c] for c in mlflow_losses(folder / "mlflow.db")] == [[1, 2, 3]]
        assert list((folder / "logs").glob("events.out.tfevents.*"))


def test_tensorboard_is_the_default(micro_model_dir, tmp_path):
    from noisepo.training.config import OptimOptions

    assert OptimOptions().report_to == ["tensorboard"]


@pytest.mark.parametrize("value, expected", [("comet", "unknown tracker 'comet'"), ("mlflow,nope", "'nope'")])
def test_an_unknown_tracker_exits_2_naming_the_option(micro_model_dir, tmp_path, capsys, value, expected):
    data = write_pairs(tmp_path / "pairs.jsonl")
    status = main(["train", "--model", micro_model_dir, "--data", str(data), "--output", str(tmp_path / "run"),
                   "--max-steps", "1", "--report-to", value])
    err = capsys.readouterr().err
    assert status == 2 and "report_to" in err.replace("-", "_") and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything is written
