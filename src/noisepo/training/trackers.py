"""Experiment trackers for every training command: TensorBoard (the default), MLflow and Weights & Biases.

transformers ships a callback for each; what we add is where they write when the user has not
said. A training run on a laptop or a cluster node without credentials should log somewhere local
rather than fail or wait for a login prompt:

- TensorBoard: OUTPUT/logs.
- MLflow: `MLFLOW_TRACKING_URI` when set (a server, a shared store); otherwise a local SQLite store,
  OUTPUT/mlflow.db (`mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db`).
- W&B: `WANDB_MODE` when set; otherwise online only if an API key is configured
  (`WANDB_API_KEY`), else offline into OUTPUT/wandb (`wandb sync OUTPUT/wandb/offline-run-*`).
  Each training run is finished at its end, so the iterations of a loop are separate runs.

Imports of mlflow and wandb are lazy: they are optional extras (`noisepo[trackers]`).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Tracker name -> the package it needs (None: always available).
TRACKERS = {"tensorboard": None, "mlflow": "mlflow", "wandb": "wandb", "none": None}

_set_by_us: dict[str, str] = {}  # environment values this module set, not the user


def check_trackers(report_to: list[str]) -> None:
    """ConfigError naming `report_to` for an unknown tracker or one whose package is missing."""
    from noisepo.errors import ConfigError

    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}", key="report_to")
        package = TRACKERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{name!r} needs the {package} package: pip install 'noisepo[trackers]' "
                              f"(or pip install {package})", key="report_to")


def tracker_callbacks(config) -> list:
    """The transformers callbacks for `config.report_to`, writing under `config.output` by default."""
    check_trackers(config.report_to)
    output = Path(config.output)
    callbacks = []
    if "tensorboard" in config.report_to:
        from transformers.integrations import TensorBoardCallback

        callback = TensorBoardCallback()
        callback.logging_dir = str(output / "logs")
        callbacks.append(callback)
    if "mlflow" in config.report_to:
        callbacks.append(_mlflow_callback(output))
    if "wandb" in config.report_to:
        callbacks.append(_wandb_callback(output))
    return callbacks


def _mlflow_callback(output: Path):
    from transformers.integrations import MLflowCallback

    class LocalMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", _set_by_us.get("mlflow")):
                # transformers leaves the URI alone when the variable is unset, which makes MLflow
                # write into the working directory; the run's own folder is where users look. SQLite:
                # MLflow 3 refuses a new file store ("maintenance mode").
                output.mkdir(parents=True, exist_ok=True)
                # mlflow.set_tracking_uri also sets the variable (for subprocesses), so a loop's next
                # iteration must tell our own value from the user's.
                _set_by_us["mlflow"] = f"sqlite:///{(output / 'mlflow.db').resolve()}"
                self._ml_flow.set_tracking_uri(_set_by_us["mlflow"])
            super().setup(args, state, model)

    return LocalMLflowCallback()


def _wandb_callback(output: Path):
    from transformers.integrations import WandbCallback

    class LocalWandbCallback(WandbCallback):
        def setup(self, args, state, model, **kwargs):
            if state.is_world_process_zero and self._wandb.run is None:
                mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                output.mkdir(parents=True, exist_ok=True)
                # transformers' setup calls wandb.init only when no run is active, so starting it here
                # decides the mode and folder and leaves the rest (config, model watching) to it.
                self._wandb.init(project=os.environ.get("WANDB_PROJECT", "noisepo"), name=f"{output.parent.name}/{output.name}",
                                 dir=str(output), mode=mode)
            super().setup(args, state, model, **kwargs)

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            super().on_train_end(args, state, control, model=model, processing_class=processing_class, **kwargs)
            if state.is_world_process_zero and self._wandb.run is not None:
                self._wandb.finish()  # a loop's next iteration is a run of its own

    return LocalWandbCallback()
