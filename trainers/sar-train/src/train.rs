//! `sar train` and `sar eval` at the top: picks the task (classification or segmentation) and
//! the tensor library's trainee for a config, and hands it to the shared loop ([`crate::run`]).
//!
//! This is the one module that knows every room: the loop imports no task, each task imports
//! only the loop's types and its library's trainee interface, and the choice between them is
//! made here.

use crate::checkpoint;
use crate::config::{BackendKind, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::run::{RunReport, Trainee};
use crate::trainees::candle::{CandleTrainee, Task};
use anyhow::{ensure, Context};
use std::path::Path;

pub use crate::run::TrainOptions;

/// The trainee for `cfg.run.backend` and the task of `cfg.data`.
pub(crate) fn trainee(cfg: &TrainConfig) -> anyhow::Result<Box<dyn Trainee>> {
    trainee_dumping(cfg, None, false)
}

/// [`trainee`], writing every rendered batch (or with `plan`, the data once and each step's
/// random choices) to `dump` (candle classification only).
fn trainee_dumping(
    cfg: &TrainConfig,
    dump: Option<&Path>,
    plan: bool,
) -> anyhow::Result<Box<dyn Trainee>> {
    let classification = !cfg.data.dataset.is_segmentation();
    ensure!(
        dump.is_none() || (classification && cfg.run.backend == BackendKind::Candle),
        "--debug-dump writes classification batches on candle only"
    );
    Ok(match cfg.run.backend {
        BackendKind::Candle => {
            let task: Box<dyn Task> = if classification {
                let mut t = crate::cls::ClsTask::new(cfg)?;
                t.dump = dump.map(Path::to_path_buf);
                t.dump_plan = plan;
                if let (Some(dir), true) = (dump, plan) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    t.dump_data(dir)?;
                }
                Box::new(t)
            } else {
                Box::new(crate::seg::SegTask::new(cfg)?)
            };
            Box::new(CandleTrainee::new(task, cfg)?)
        }
        BackendKind::Dfdx => crate::trainees::dfdx::trainee(cfg)?,
    })
}

/// Trains as `cfg` says (see [`crate::run`]). Returns the final report (also written to
/// `run.output/report.json`).
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> anyhow::Result<RunReport> {
    crate::run::run(cfg, opts, &|| {
        trainee_dumping(cfg, opts.dump.as_deref(), opts.dump_plan)
    })
}

/// `sar eval`: the checkpoint's model on its config's test set, on the backend that trained
/// it or on `backend` (checkpoints name their tensors the same way on every backend).
pub fn eval_checkpoint(
    path: &Path,
    backend: Option<BackendKind>,
) -> anyhow::Result<(TrainConfig, TaskEvaluation)> {
    let ck = checkpoint::load(path)?;
    let mut cfg = ck.state.config.clone();
    if let Some(b) = backend {
        cfg.run.backend = b;
        cfg.validate()?;
    }
    let mut task = trainee(&cfg)?;
    task.load_state(&ck.tensors)
        .with_context(|| format!("checkpoint {}", path.display()))?;
    let e = task.evaluate()?;
    Ok((cfg, e))
}
