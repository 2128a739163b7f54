//! The training loop, shared by every task and tensor library: epochs and steps, the learning
//! rate schedule, the NaN/inf policy, logging, evaluation, checkpoints, resume and the report.
//!
//! It sees the model only through `Trainee` (forward and loss, update, the state a
//! checkpoint holds, evaluation) and imports no task: classification ([`crate::cls`]),
//! segmentation ([`crate::seg`]) and each library's trainee ([`crate::trainees`]) live in their
//! own modules, and [`crate::train`] picks them.
//!
//! Reproducibility: weights, anchors, data order and augmentation derive from `run.seed` and
//! counters (epoch, position), so a run is a function of its config; a checkpoint holds every
//! variable, the momentum buffers, the SAR buffers and the step, and `--resume` continues
//! bit for bit on the CPU (tested).
//!
//! Outputs in `run.output`: `config.toml` (the config in force, written before the first
//! step), `metrics.jsonl` ([`log`]), `checkpoints/`, `report.json`, and the PNG plots. The
//! folder belongs to one run ([`folder`]: a lock, no silent overwrite, one line of descent),
//! and a stop request ([`stop`], SIGTERM/SIGINT in the binary) ends the run after the step in
//! progress with a checkpoint of it.

pub mod folder;
pub mod log;
pub mod stop;

use crate::checkpoint::{self, CheckpointState};
use crate::config::{NonFinitePolicy, SamplerKind, ScheduleKind, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::optim::{learning_rate, Schedule, Warmup};
use anyhow::{bail, ensure, Context};
use candle_core::Tensor;
use folder::RunFolder;
use log::MetricsLog;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use stop::{Interrupted, StopRequest};

pub use log::loss_series;

/// Loss parts of one step, or their mean over a logging window or an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct LossParts {
    /// Cross-entropy (segmentation: of the decode head).
    pub ce: f64,
    /// Segmentation: the auxiliary head's cross-entropy times its weight (0 without one).
    pub head_aux: f64,
    /// L_aux (unweighted).
    pub aux: f64,
    /// L_p2a (unweighted; 0 on steps where the gate failed).
    pub p2a: f64,
    /// The total loss minimised.
    pub total: f64,
}

impl LossParts {
    fn add(&mut self, o: &LossParts) {
        self.ce += o.ce;
        self.head_aux += o.head_aux;
        self.aux += o.aux;
        self.p2a += o.p2a;
        self.total += o.total;
    }
    fn scaled(&self, k: f64) -> LossParts {
        LossParts {
            ce: self.ce * k,
            head_aux: self.head_aux * k,
            aux: self.aux * k,
            p2a: self.p2a * k,
            total: self.total * k,
        }
    }
}

/// The result of a training run (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `run.name`.
    pub name: String,
    /// Whether SAR was on.
    pub sar: bool,
    /// Final test evaluation.
    #[serde(flatten)]
    pub eval: TaskEvaluation,
    /// Training images (segmentation: labelled pixels) per class.
    pub train_counts: Vec<u64>,
    /// Loss parts averaged over the last epoch.
    pub loss: LossParts,
    /// Step at which SAR's gate first passed.
    pub gate_first_pass: Option<u64>,
    /// Share of steps since then on which it passed.
    pub gate_pass_rate: f64,
    /// Steps skipped for a non-finite loss.
    pub skipped_steps: u64,
    /// Optimiser steps.
    pub steps: u64,
    /// Training wall time in seconds (evaluation excluded, resumed parts included).
    pub wall_seconds: f64,
    /// Parameters and multiply-adds per image of the model, without SAR.
    pub model_cost: sar_models::Cost,
    /// Parameters SAR adds (h_ψ); SAR adds no inference cost.
    pub sar_params: u64,
    /// `stage.init_from`: the checkpoint the weights came from, its run and step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// Where a run's starting weights came from (`stage.init_from`).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct InitFrom {
    /// The checkpoint file.
    pub checkpoint: String,
    /// `run.name` of the run that wrote it.
    pub run: String,
    /// Its step.
    pub step: u64,
    /// Whether SAR was on in that run.
    pub sar: bool,
}

/// Options of a training run beyond the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// A checkpoint file, or a run folder whose newest checkpoint is used.
    pub resume: Option<PathBuf>,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Print a line per evaluation.
    pub verbose: bool,
    /// Fault injection for tests: the input batches of these steps are set to NaN, so the
    /// non-finite handling runs on its real path.
    pub poison_steps: Vec<u64>,
    /// Fault injection for tests: the cross-entropy of these steps is multiplied by +inf.
    pub poison_loss_steps: Vec<u64>,
    /// Delete the files of a run already in the output folder instead of refusing to start
    /// (see [`folder`]).
    pub overwrite: bool,
    /// Stop after the step in progress, with a checkpoint, once this is raised.
    pub stop: Option<StopRequest>,
    /// For tests of the stop: every step sleeps this long before its forward pass, so a
    /// signal lands inside a step.
    pub step_delay: Option<std::time::Duration>,
    /// Debug: write the initial state (`initial.safetensors`, a checkpoint of step 0), the
    /// training-set size (`meta.json`) and every rendered batch into this folder, for replaying
    /// the run elsewhere (the PyTorch mirror).
    pub dump: Option<PathBuf>,
    /// With `dump`: write the data once and each step's random choices (`plan.jsonl`) instead
    /// of every rendered batch, small enough for whole runs (`train_mirror.py --end-to-end`).
    pub dump_plan: bool,
}

/// Where a training step is in the run.
pub(crate) struct StepCtx<'a> {
    /// Training samples of the batch.
    pub idx: &'a [usize],
    /// Epoch (pass over the data).
    pub epoch: u64,
    /// Batch within the epoch.
    pub batch: usize,
    /// Position of the batch's first sample within the epoch.
    pub position: u64,
    /// Optimiser step.
    pub step: u64,
    /// Fault injection: NaN input.
    pub poison_input: bool,
    /// Fault injection: infinite task loss.
    pub poison_loss: bool,
}

/// What a successful forward pass reports to the loop (the loss itself stays with the trainee
/// until `Trainee::update`).
pub(crate) struct StepReport {
    pub parts: LossParts,
    pub gate: bool,
    pub valid: usize,
    pub images: usize,
}

/// The loop's view of a model in training, whatever tensor library runs it: forward and loss,
/// the update, the state a checkpoint holds (as candle CPU tensors under the shared names), and
/// evaluation.
pub(crate) trait Trainee {
    /// Training samples.
    fn train_len(&self) -> usize;
    /// Training images (classification) or pixels (segmentation) per class.
    fn train_counts(&self) -> &[u64];
    /// Forward pass and loss of one batch; `Err(message)` for a non-finite input or loss part.
    fn forward(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepReport, String>>;
    /// Backward of the last forward's loss and one optimiser step; `rate(initial)` is the
    /// scheduled rate of a parameter group whose initial rate is `initial` (`optim.lr` times
    /// its multipliers).
    fn update(&mut self, rate: &dyn Fn(f64) -> f64) -> anyhow::Result<()>;
    /// Deep copies of the state a forward pass changes (BatchNorm running statistics, SAR
    /// buffers), to undo a skipped step.
    fn snapshot(&self) -> anyhow::Result<Vec<(String, Tensor)>>;
    /// Puts a `Trainee::snapshot` back.
    fn restore(&mut self, snap: &[(String, Tensor)]) -> anyhow::Result<()>;
    /// Every variable, `optim.momentum.*` buffer and SAR buffer, by name.
    fn state_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>>;
    /// Restores `Trainee::state_tensors` from a checkpoint (every variable required).
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()>;
    /// Loads pretrained weights as `model.pretrained` says; returns the number loaded and the
    /// names kept from the initialisation.
    fn load_pretrained(
        &mut self,
        cfg: &TrainConfig,
        path: &Path,
    ) -> anyhow::Result<(usize, Vec<String>)>;
    /// Parameters SAR adds.
    fn sar_params(&self) -> u64;
    /// Test-set evaluation.
    fn evaluate(&self) -> anyhow::Result<TaskEvaluation>;
    /// Parameters and multiply-adds of inference on one training-size input.
    fn cost(&self) -> sar_models::Cost;
    /// PNG plots beyond the loss curves.
    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()>;
    /// The class of each training sample (for `train.sampler = "class-balanced"`).
    fn train_labels(&self) -> Option<Vec<usize>> {
        None
    }
    /// `stage.init_from`: the model's weights and BatchNorm statistics from a checkpoint's
    /// tensors; returns how many were loaded and the names left at their initialisation.
    fn init_weights(
        &mut self,
        _tensors: &HashMap<String, Tensor>,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        anyhow::bail!("this backend cannot start from another run's weights (stage.init_from)")
    }
}

/// The loss parts, or a message naming the first that is NaN or infinite.
pub(crate) fn loss_parts(
    step: u64,
    ce: f64,
    head_aux: f64,
    aux: f64,
    p2a: f64,
    total: f64,
) -> Result<LossParts, String> {
    let named = [
        ("cross-entropy", ce),
        ("auxiliary-head cross-entropy", head_aux),
        ("L_aux", aux),
        ("L_p2a", p2a),
        ("total", total),
    ];
    if let Some((name, v)) = named.iter().find(|(_, v)| !v.is_finite()) {
        return Err(format!("step {step}: loss part {name} is {v}"));
    }
    Ok(LossParts {
        ce,
        head_aux,
        aux,
        p2a,
        total,
    })
}

/// The step counts and the learning-rate schedule of a run.
struct Plan {
    batch: usize,
    train_len: usize,
    steps_per_epoch: usize,
    /// Steps of the whole schedule (`train.iters`, or epochs × steps per epoch).
    total_steps: u64,
    epochs: usize,
    /// Where this invocation stops (`train.max_steps` cuts a run short).
    last_step: u64,
    warmup: Warmup,
    schedule: Schedule,
}

impl Plan {
    fn new(cfg: &TrainConfig, train_len: usize) -> Self {
        let batch = cfg.train.batch_size;
        let steps_per_epoch = train_len.div_ceil(batch);
        let (total_steps, epochs) = match cfg.train.iters {
            Some(i) => (i as u64, i.div_ceil(steps_per_epoch)),
            None => (
                (cfg.train.epochs * steps_per_epoch) as u64,
                cfg.train.epochs,
            ),
        };
        let last_step = cfg
            .train
            .max_steps
            .map_or(total_steps, |m| (m as u64).min(total_steps));
        let o = &cfg.optim;
        let schedule = match o.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Cosine => Schedule::Cosine,
            ScheduleKind::CosineEpoch => Schedule::CosineEpoch {
                steps_per_epoch,
                epochs,
            },
            ScheduleKind::Step => Schedule::Step {
                milestones: o.milestones.iter().map(|e| e * steps_per_epoch).collect(),
                gamma: o.gamma,
            },
            ScheduleKind::Poly => Schedule::Poly {
                power: o.power,
                min_lr: o.min_lr,
            },
        };
        Plan {
            batch,
            train_len,
            steps_per_epoch,
            total_steps,
            epochs,
            last_step,
            warmup: if o.warmup_iters > 0 {
                Warmup::LinearRatio {
                    steps: o.warmup_iters,
                    ratio: o.warmup_ratio,
                }
            } else if o.warmup_epochs > 0 {
                Warmup::Linear {
                    steps: o.warmup_epochs * steps_per_epoch,
                }
            } else {
                Warmup::None
            },
            schedule,
        }
    }

    /// The learning rate of step `step` (0-based).
    fn lr(&self, base: f64, step: u64) -> f64 {
        learning_rate(
            &self.schedule,
            base,
            step as usize,
            self.total_steps as usize,
            self.warmup,
        )
    }
}

/// Wall-clock measure of the steps since the last `"train"` log line (the loss sums are in
/// the checkpoint state, [`checkpoint::RunningSums`]).
struct Window {
    images: usize,
    start: Instant,
}

impl Window {
    fn new() -> Self {
        Window {
            images: 0,
            start: Instant::now(),
        }
    }
}

/// Adds a successful step to the window and epoch sums.
fn add_step(sums: &mut checkpoint::RunningSums, r: &StepReport) {
    sums.window.add(&r.parts);
    sums.window_steps += 1;
    sums.window_gate_passes += r.gate as u64;
    sums.window_p2a_rows += r.valid as u64;
    sums.epoch.add(&r.parts);
    sums.epoch_steps += 1;
}

/// Trains the trainee that `make_trainee` builds as `cfg` says. Returns the final report
/// (also written to `run.output/report.json`), or [`Interrupted`] after a stop request.
pub(crate) fn run(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    make_trainee: &dyn Fn() -> anyhow::Result<Box<dyn Trainee>>,
) -> anyhow::Result<RunReport> {
    let out = &cfg.run.output;
    // Nothing in the folder is read or changed before the lock is held.
    let folder = RunFolder::lock(out)?;
    let resume_from = match &opts.resume {
        Some(from) => Some(checkpoint_to_resume(cfg, from)?),
        None => None,
    };
    let own_checkpoint = match &resume_from {
        None => {
            folder.prepare_fresh(opts.overwrite, "sar train")?;
            false
        }
        Some((path, ck)) => folder.prepare_resume(path, ck.state.step, opts.overwrite)?,
    };
    let ckpt_dir = out.join(folder::CHECKPOINTS);
    std::fs::create_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;
    let stale = checkpoint::remove_stale_temporaries(&ckpt_dir)?;
    let mut trainee = make_trainee()?;
    let plan = Plan::new(cfg, trainee.train_len());
    let balanced_labels =
        match cfg.train.sampler {
            SamplerKind::Shuffle => None,
            SamplerKind::ClassBalanced => Some(trainee.train_labels().context(
                "train.sampler = \"class-balanced\" needs one class per training sample",
            )?),
        };
    let metrics = out.join("metrics.jsonl");
    let dropped = match &resume_from {
        Some((_, ck)) if own_checkpoint => log::truncate_to(&metrics, ck.state.step)?,
        _ => 0,
    };
    let mut log = MetricsLog::open(metrics)?;
    crate::tensorio::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let state = match resume_from {
        Some((path, ck)) => {
            trainee
                .load_state(&ck.tensors)
                .with_context(|| format!("cannot resume from {}", path.display()))?;
            log.write(serde_json::json!({"kind": "resume", "step": ck.state.step, "from": path.display().to_string(), "stale_temporaries_removed": stale, "log_lines_dropped": dropped}))?;
            CheckpointState {
                config: cfg.clone(),
                ..ck.state
            }
        }
        None => start(cfg, trainee.as_mut(), &mut log)?,
    };
    if let Some(dir) = &opts.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        checkpoint::save(
            &dir.join("initial.safetensors"),
            &trainee.state_tensors()?,
            &state,
        )?;
        let meta = serde_json::json!({"train_len": plan.train_len, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps});
        crate::tensorio::write_atomic(&dir.join("meta.json"), meta.to_string().as_bytes())?;
    }
    let mut lp = Loop {
        cfg,
        opts,
        bar: progress_bar(cfg, opts, plan.last_step, state.step),
        plan,
        trainee,
        log,
        ckpt_dir,
        epoch: state.epoch as usize,
        saved_step: None,
        state,
        lr: cfg.optim.lr,
        window: Window::new(),
        last_epoch_loss: LossParts::default(),
        consecutive_skips: 0,
        clock: Instant::now(),
        balanced_labels,
    };
    if lp.state.batch_in_epoch == 0 {
        // A checkpoint at an epoch's end holds that epoch's sums: close it as the loop does.
        lp.close_epoch_loss();
    }
    lp.epochs()?;
    lp.finish()
}

/// A fresh run: pretrained weights, if the config names them, and the state of step 0.
fn start(
    cfg: &TrainConfig,
    trainee: &mut dyn Trainee,
    log: &mut MetricsLog,
) -> anyhow::Result<CheckpointState> {
    if let Some(p) = cfg.model.pretrained() {
        let (loaded, kept) = trainee.load_pretrained(cfg, p)?;
        log.write(serde_json::json!({"kind": "pretrained", "file": p.display().to_string(), "loaded": loaded, "kept": kept}))?;
    }
    let mut init_from = None;
    if let Some(from) = &cfg.stage.init_from {
        let (path, ck) = init_checkpoint(cfg, from)?;
        let (loaded, fresh) = trainee
            .init_weights(&ck.tensors)
            .with_context(|| format!("stage.init_from {}", path.display()))?;
        log.write(serde_json::json!({"kind": "init_from", "file": path.display().to_string(), "run": ck.state.config.run.name, "step": ck.state.step, "loaded": loaded, "fresh": fresh}))?;
        init_from = Some(InitFrom {
            checkpoint: path.display().to_string(),
            run: ck.state.config.run.name.clone(),
            step: ck.state.step,
            sar: ck.state.config.sar.enabled,
        });
    }
    Ok(CheckpointState {
        format: checkpoint::FORMAT.into(),
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        config: cfg.clone(),
        gate_first_pass: None,
        gate_passes: 0,
        skipped_steps: 0,
        elapsed_seconds: 0.0,
        sums: Default::default(),
        init_from,
    })
}

/// The checkpoint that `--resume FROM` names: the file itself, or the newest checkpoint of a
/// run folder (or of a `checkpoints` folder).
fn resume_path(from: &Path) -> anyhow::Result<PathBuf> {
    if !from.is_dir() {
        return Ok(from.to_path_buf());
    }
    let dir = if from.join("checkpoints").is_dir() {
        from.join("checkpoints")
    } else {
        from.to_path_buf()
    };
    checkpoint::latest(&dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))
}

/// The checkpoint `stage.init_from` names, verified, after checking that it holds this
/// model on this data set.
fn init_checkpoint(
    cfg: &TrainConfig,
    from: &Path,
) -> anyhow::Result<(PathBuf, checkpoint::Checkpoint)> {
    let path = resume_path(from).with_context(|| format!("stage.init_from {}", from.display()))?;
    let ck =
        checkpoint::load(&path).with_context(|| format!("stage.init_from {}", path.display()))?;
    let old = &ck.state.config;
    ensure!(
        old.model == cfg.model,
        "stage.init_from {}: it holds another [model] than this config's",
        path.display()
    );
    ensure!(
        old.data.dataset == cfg.data.dataset,
        "stage.init_from {}: it was trained on data.dataset = {:?}, this config has {:?}",
        path.display(),
        old.data.dataset,
        cfg.data.dataset
    );
    Ok((path, ck))
}

/// The checkpoint `from` names, verified, after checking that it is of this run (same model,
/// data, seed, batch size, SAR switch and iteration count).
fn checkpoint_to_resume(
    cfg: &TrainConfig,
    from: &Path,
) -> anyhow::Result<(PathBuf, checkpoint::Checkpoint)> {
    let path = resume_path(from)?;
    let ck = checkpoint::load(&path)?;
    let old = &ck.state.config;
    for (what, same) in [
        ("[model]", old.model == cfg.model),
        ("[data]", old.data == cfg.data),
        ("sar.enabled", old.sar.enabled == cfg.sar.enabled),
        ("sar.kind", old.sar.kind == cfg.sar.kind),
        ("run.seed", old.run.seed == cfg.run.seed),
        (
            "train.batch_size",
            old.train.batch_size == cfg.train.batch_size,
        ),
        ("train.iters", old.train.iters == cfg.train.iters),
    ] {
        ensure!(
            same,
            "cannot resume from {}: its {what} differs from this config",
            path.display()
        );
    }
    Ok((path, ck))
}

fn progress_bar(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    last_step: u64,
    step: u64,
) -> indicatif::ProgressBar {
    let bar = if opts.progress {
        indicatif::ProgressBar::new(last_step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(cfg.run.name.clone());
    bar.set_position(step);
    bar
}

/// The running loop's state.
struct Loop<'a> {
    cfg: &'a TrainConfig,
    opts: &'a TrainOptions,
    plan: Plan,
    trainee: Box<dyn Trainee>,
    log: MetricsLog,
    ckpt_dir: PathBuf,
    bar: indicatif::ProgressBar,
    /// What a checkpoint records of the loop (step, epoch, position, gate statistics).
    state: CheckpointState,
    epoch: usize,
    /// The step of the last checkpoint this process wrote.
    saved_step: Option<u64>,
    /// The learning rate of the last update.
    lr: f64,
    window: Window,
    last_epoch_loss: LossParts,
    consecutive_skips: usize,
    /// Training time since it was last added to `state.elapsed_seconds`.
    clock: Instant,
    /// `train.sampler = "class-balanced"`: each training sample's class.
    balanced_labels: Option<Vec<usize>>,
}

impl Loop<'_> {
    /// Every remaining epoch, each followed by its evaluation when `eval_every` says.
    fn epochs(&mut self) -> anyhow::Result<()> {
        while self.epoch < self.plan.epochs {
            let order = match &self.balanced_labels {
                None => sar_data::augment::epoch_order(
                    self.plan.train_len,
                    self.cfg.run.seed,
                    self.epoch as u64,
                ),
                Some(labels) => {
                    let mut o = sar_data::augment::class_balanced_order(
                        labels,
                        self.cfg.train.samples_per_class,
                        self.cfg.run.seed,
                        self.epoch as u64,
                    );
                    o.truncate(self.plan.train_len);
                    o
                }
            };
            let first_batch = if self.epoch as u64 == self.state.epoch {
                self.state.batch_in_epoch as usize
            } else {
                0
            };
            for b in first_batch..self.plan.steps_per_epoch {
                if self.state.step >= self.plan.last_step {
                    return Ok(());
                }
                let batch = self.plan.batch;
                let idx = &order[b * batch..((b + 1) * batch).min(order.len())];
                self.step(b, idx)?;
                self.after_step(b)?;
                if let Some(signal) = self.opts.stop.as_ref().and_then(StopRequest::asked) {
                    return Err(self.interrupt(signal)?.into());
                }
            }
            self.end_epoch()?;
        }
        Ok(())
    }

    /// One step: forward, then the update, or the non-finite policy.
    fn step(&mut self, b: usize, idx: &[usize]) -> anyhow::Result<()> {
        let step = self.state.step;
        if let Some(d) = self.opts.step_delay {
            std::thread::sleep(d);
        }
        // Forward passes update BatchNorm running statistics and the SAR EMA: a skipped
        // step must not leave NaN there, so keep a deep copy when skipping is allowed.
        let snapshot = match self.cfg.train.on_nonfinite {
            NonFinitePolicy::Skip => Some(self.trainee.snapshot()?),
            NonFinitePolicy::Stop => None,
        };
        let outcome = self.trainee.forward(&StepCtx {
            idx,
            epoch: self.epoch as u64,
            batch: b,
            position: (b * self.plan.batch) as u64,
            step,
            poison_input: self.opts.poison_steps.contains(&step),
            poison_loss: self.opts.poison_loss_steps.contains(&step),
        })?;
        // A skipped batch is consumed without an update; the step counter still moves on,
        // so the run stays a function of its config.
        self.state.step += 1;
        self.state.batch_in_epoch = b as u64 + 1;
        self.bar.inc(1);
        match outcome {
            Err(msg) => self.non_finite(step, &msg, snapshot),
            Ok(report) => {
                self.consecutive_skips = 0;
                self.lr = self.plan.lr(self.cfg.optim.lr, step);
                let plan = &self.plan;
                self.trainee.update(&|initial| plan.lr(initial, step))?;
                if report.gate {
                    self.state.gate_first_pass.get_or_insert(step);
                    self.state.gate_passes += 1;
                }
                add_step(&mut self.state.sums, &report);
                self.window.images += report.images;
                Ok(())
            }
        }
    }

    /// `train.on_nonfinite`: stop with the last checkpoint intact, or skip the step and undo
    /// what its forward pass changed.
    fn non_finite(
        &mut self,
        step: u64,
        msg: &str,
        snapshot: Option<Vec<(String, Tensor)>>,
    ) -> anyhow::Result<()> {
        match self.cfg.train.on_nonfinite {
            NonFinitePolicy::Stop => {
                self.log.write(
                    serde_json::json!({"kind": "nonfinite", "step": step, "message": msg}),
                )?;
                self.bar.abandon();
                bail!(
                    "{msg}; training stopped (the last checkpoint in {} is intact)",
                    self.ckpt_dir.display()
                );
            }
            NonFinitePolicy::Skip => {
                self.consecutive_skips += 1;
                self.state.skipped_steps += 1;
                self.log
                    .write(serde_json::json!({"kind": "skip", "step": step, "message": msg}))?;
                ensure!(
                    self.consecutive_skips <= 10,
                    "{msg}; 10 consecutive steps were skipped, stopping"
                );
                if let Some(snap) = &snapshot {
                    self.trainee.restore(snap)?;
                }
                Ok(())
            }
        }
    }

    /// Logging, the checkpoint and the evaluation that fall due after batch `b`.
    fn after_step(&mut self, b: usize) -> anyhow::Result<()> {
        let train = &self.cfg.train;
        let step = self.state.step;
        if train.log_every > 0 && step.is_multiple_of(train.log_every as u64) {
            self.log_window()?;
        }
        let end_of_epoch = b + 1 == self.plan.steps_per_epoch;
        if end_of_epoch {
            self.state.epoch = self.epoch as u64 + 1;
            self.state.batch_in_epoch = 0;
        }
        let periodic = train.checkpoint_every_steps > 0
            && step.is_multiple_of(train.checkpoint_every_steps as u64);
        if periodic || end_of_epoch || step == self.plan.last_step {
            self.save()?;
        }
        if train.eval_every_steps > 0
            && step.is_multiple_of(train.eval_every_steps as u64)
            && step < self.plan.last_step
        {
            let e = self.evaluate_and_log(false)?;
            if self.opts.verbose {
                self.bar.println(format!("step {step}: {}", e.summary()));
            }
            self.clock = Instant::now();
        }
        Ok(())
    }

    /// A `"train"` line with the window's means; starts a new window.
    fn log_window(&mut self) -> anyhow::Result<()> {
        let w = &mut self.state.sums;
        let k = w.window_steps.max(1) as f64;
        let secs = self.window.start.elapsed().as_secs_f64();
        let m = w.window.scaled(1.0 / k);
        self.log.write(serde_json::json!({
            "kind": "train", "step": self.state.step, "epoch": self.epoch, "lr": self.lr,
            "loss": m.total, "ce": m.ce, "head_aux": m.head_aux, "aux": m.aux,
            "p2a": m.p2a, "gate_pass_rate": w.window_gate_passes as f64 / k,
            "p2a_rows_per_step": w.window_p2a_rows as f64 / k,
            "images_per_s": self.window.images as f64 / secs.max(1e-9),
        }))?;
        self.bar.set_message(format!("loss {:.4}", m.total));
        (
            w.window,
            w.window_steps,
            w.window_gate_passes,
            w.window_p2a_rows,
        ) = (LossParts::default(), 0, 0, 0);
        self.window = Window::new();
        Ok(())
    }

    /// A verified checkpoint of the current step; older ones beyond `keep_checkpoints` go.
    fn save(&mut self) -> anyhow::Result<()> {
        self.state.elapsed_seconds += self.clock.elapsed().as_secs_f64();
        self.clock = Instant::now();
        checkpoint::save(
            &checkpoint::path_for(&self.ckpt_dir, self.state.step),
            &self.trainee.state_tensors()?,
            &self.state,
        )?;
        self.saved_step = Some(self.state.step);
        checkpoint::prune(
            &self.ckpt_dir,
            self.cfg.train.keep_checkpoints,
            self.state.step,
        )
    }

    /// The stop a signal asked for: a checkpoint of the step just done (unless it was just
    /// written), a `"stop"` record, and the [`Interrupted`] error.
    fn interrupt(&mut self, signal: i32) -> anyhow::Result<Interrupted> {
        if self.saved_step != Some(self.state.step) {
            self.save()?;
        }
        let step = self.state.step;
        self.log
            .write(serde_json::json!({"kind": "stop", "step": step, "signal": signal}))?;
        self.bar.abandon();
        Ok(Interrupted {
            signal,
            step,
            checkpoint: checkpoint::path_for(&self.ckpt_dir, step),
            folder: self.cfg.run.output.clone(),
        })
    }

    fn evaluate_and_log(&mut self, last: bool) -> anyhow::Result<TaskEvaluation> {
        let e = self.trainee.evaluate()?;
        let mut v = serde_json::to_value(&e)?;
        v["kind"] = "eval".into();
        v["step"] = self.state.step.into();
        v["epoch"] = self.epoch.into();
        v["final"] = last.into();
        self.log.write(v)?;
        Ok(e)
    }

    /// Closes an epoch: its mean loss, and the evaluation `eval_every` asks for.
    fn end_epoch(&mut self) -> anyhow::Result<()> {
        self.close_epoch_loss();
        self.epoch += 1;
        let c = self.cfg;
        if c.train.iters.is_none()
            && c.train.eval_every > 0
            && self.epoch.is_multiple_of(c.train.eval_every)
            && self.epoch < self.plan.epochs
        {
            let e = self.evaluate_and_log(false)?;
            if self.opts.verbose {
                self.bar
                    .println(format!("epoch {}: {}", self.epoch, e.summary()));
            }
        }
        self.clock = Instant::now();
        Ok(())
    }

    /// The epoch's mean loss parts (the report's `loss`); starts the next epoch's sums.
    fn close_epoch_loss(&mut self) {
        let sums = &mut self.state.sums;
        self.last_epoch_loss = sums.epoch.scaled(1.0 / sums.epoch_steps.max(1) as f64);
        (sums.epoch, sums.epoch_steps) = (LossParts::default(), 0);
    }

    /// The final evaluation, `report.json` and the plots.
    fn finish(mut self) -> anyhow::Result<RunReport> {
        self.bar.finish_and_clear();
        let eval = self.evaluate_and_log(true)?;
        let s = &self.state;
        let after_first = s.gate_first_pass.map_or(0, |f| s.step - f);
        let cfg = self.cfg;
        let report = RunReport {
            name: cfg.run.name.clone(),
            sar: cfg.sar.enabled,
            eval,
            train_counts: self.trainee.train_counts().to_vec(),
            loss: self.last_epoch_loss,
            gate_first_pass: s.gate_first_pass,
            gate_pass_rate: if after_first == 0 {
                0.0
            } else {
                s.gate_passes as f64 / after_first as f64
            },
            skipped_steps: s.skipped_steps,
            steps: s.step,
            wall_seconds: s.elapsed_seconds,
            model_cost: self.trainee.cost(),
            sar_params: self.trainee.sar_params(),
            init_from: s.init_from.clone(),
        };
        let out = &cfg.run.output;
        crate::tensorio::write_atomic(
            &out.join("report.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        if cfg.train.plots {
            crate::plots::curves(
                &out.join("loss.png"),
                &format!("{}: training loss", cfg.run.name),
                "step",
                "loss",
                &loss_series(&out.join("metrics.jsonl"))?,
            )?;
            self.trainee.write_plots(cfg, &report)?;
        }
        Ok(report)
    }
}
