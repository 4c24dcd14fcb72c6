"""Where a run's metrics go: `metrics.jsonl` and TensorBoard always, Weights & Biases when configured."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from launch.config import ConfigError, RunConfig

WANDB_ID_FILE = "wandb_run_id"


def start_wandb(cfg: RunConfig, out_dir: Path, resuming: bool):
    """The W&B run of this `output_dir`, or None when `logging.wandb_project` is unset.

    A fresh start creates a new W&B run and keeps its id in `output_dir/wandb_run_id`; a resumed start
    continues that run, so a preempted job stays one run in the W&B UI. Called before any actor starts, so a
    missing login fails the job at once.
    """
    lc = cfg.logging
    if lc.wandb_project is None:
        return None
    import wandb

    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.exists() else uuid.uuid4().hex[:8]
    try:
        run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, name=lc.wandb_run_name or out_dir.resolve().name,
                         id=run_id, resume="allow", mode=lc.wandb_mode, dir=str(out_dir), config=cfg.to_dict())
    except Exception as e:  # wandb raises several types (UsageError, CommError, ...); all mean the same to the user
        raise ConfigError(
            f"Weights & Biases could not start ({type(e).__name__}: {e}). Log in with `wandb login` or set "
            f"WANDB_API_KEY, or set logging.wandb_mode=offline (upload later with `wandb sync`), or unset "
            f"logging.wandb_project.") from e
    id_file.write_text(run_id)
    # our step is the x-axis: after a resume the steps past the checkpoint are logged again, and W&B's own
    # step counter (which only grows) would drop them
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class MetricsLog:
    """metrics.jsonl (one JSON line per step) + TensorBoard scalars (+ W&B), namespaced (loss/, time/, ...)."""

    def __init__(self, out_dir: Path, resume_step: int = 0, wandb_run=None):
        from torch.utils.tensorboard import SummaryWriter
        self.path = out_dir / "metrics.jsonl"
        if resume_step == 0 and self.path.exists():
            self.path.unlink()
        elif self.path.exists():  # drop lines past the checkpoint we resume from
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in lines))
        self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.wandb = wandb_run

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"step": step, **scalars})

    def write_summary(self, summary: dict) -> None:
        """End-of-run figures (held-out reverse KL before/after, the model folder) into the W&B run's summary."""
        if self.wandb is None:
            return
        for phase in ("eval_before", "eval_after"):
            for k, v in (summary.get(phase) or {}).items():
                self.wandb.summary[f"{phase}/{k}"] = v
        for k in ("train_seconds", "model_dir"):
            if k in summary:
                self.wandb.summary[k] = summary[k]

    def close(self) -> None:
        self.tb.close()


def finish_wandb(run, failed: bool) -> None:
    if run is not None:
        run.finish(exit_code=1 if failed else 0)
