"""Optional mirroring of a study to MLflow or Weights & Biases.

Training curves go through the Trainer's own `report_to` callbacks; evaluation metrics are logged
by the driver after they are stored. Both default to offline, local files next to the results
(an MLflow file store, a W&B offline run folder) unless the user's environment says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from taxon.errors import TaxonError

BACKENDS = ("mlflow", "wandb")


def check(report_to: tuple[str, ...]) -> None:
    """Fail at once, in one line, on an unknown backend or a missing optional extra."""
    for name in report_to:
        if name not in BACKENDS:
            raise TaxonError(f"--report-to {name}: unknown; use one of {', '.join(BACKENDS)}")
        if importlib.util.find_spec(name) is None:
            raise TaxonError(f"--report-to {name} needs the optional extra: "
                             f"pip install 'taxon[{name}]'")


def setup(report_to: tuple[str, ...], study: str, root: Path) -> None:
    """Offline defaults, set before any worker starts so workers inherit them."""
    if "mlflow" in report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (root / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", study)
        if os.environ["MLFLOW_TRACKING_URI"].startswith("file:"):
            # MLflow 3 refuses its file store unless asked; it is what works offline without a server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_PROJECT", study)
        os.environ.setdefault("WANDB_DIR", str(root.resolve()))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)


def env_vars() -> dict[str, str]:
    """The tracking settings a remote worker needs."""
    return {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_"))}


def close_training_runs(report_to: tuple[str, ...]) -> None:
    """End the run a Trainer callback left open, so the next stage in this process gets its own."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if "mlflow" in report_to:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()


def _flat(metrics: dict) -> dict[str, float]:
    out = {}
    for name, m in metrics.items():
        if isinstance(m, dict) and "value" in m:
            for part in ("value", "low", "high"):
                if isinstance(m.get(part), int | float):
                    out[name if part == "value" else f"{name}_{part}"] = float(m[part])
    return out


def log_eval(report_to: tuple[str, ...], study: str, experiments: list[str], model_key: str,
             task: str, metrics: dict, resources: dict) -> None:
    values = {f"{task}/{k}": v for k, v in _flat(metrics).items()}
    values.update({f"{task}/{k}": float(v) for k, v in resources.items()
                   if isinstance(v, int | float)})
    name = f"eval {', '.join(experiments)} {task}"
    tags = {"taxon.kind": "eval", "taxon.model_key": model_key, "taxon.task": task,
            "taxon.experiments": ",".join(experiments)}
    if "mlflow" in report_to:
        import mlflow

        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", study))
        with mlflow.start_run(run_name=name, tags=tags):
            mlflow.log_metrics(values)
    if "wandb" in report_to:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", study), name=name,
                         job_type="eval", config=tags)
        run.log(values)
        run.finish()
