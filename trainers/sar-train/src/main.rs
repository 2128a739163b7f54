//! The `sar` command-line program.
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Training allocates and frees feature-sized tensors (hundreds of MB) every step. glibc serves
/// each with a fresh mmap, so every step pays a page fault and a kernel zero-fill per 4 KiB,
/// which at segmentation scale costs more than the SAR kernels themselves; jemalloc keeps freed
/// pages mapped for reuse (PyTorch's caching allocator avoids the same cost).
/// Freed pages are never purged: a training process reuses its peak footprint every step, and
/// a purged page costs a fault and a zero-fill on its next use (`_RJEM_MALLOC_CONF` overrides).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
#[used]
static JEMALLOC_CONF: &[u8; 36] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

/// The default build's allocator is glibc's malloc, which serves every block above its mmap
/// threshold (dynamic, 128 KiB at first) with a fresh mmap and trims the heap top as soon as
/// 128 KiB are free, so the feature-sized buffers a step allocates and frees cost a page fault
/// and a kernel zero-fill per 4 KiB on every step. Raising the threshold to glibc's maximum
/// (32 MiB), never trimming and growing the heap in 256 MiB steps keeps that memory for reuse.
/// Measured on the small CNN over one Fashion-MNIST-LT epoch (2 cores): 1.8 M minor page faults
/// and 6–7 s of system time become 36 k and 0.5 s, and the run's wall time falls from ~23.5 to
/// ~19.3 s, at the same peak RSS. Blocks above 32 MiB (segmentation scale: features of hundreds
/// of MB) would still be mapped afresh by the main thread, so mmap is switched off for it too
/// (`M_MMAP_MAX` 0: the heap serves them and keeps them): SAR's math at Cityscapes scale through
/// candle's composite ops 1,436 → 348 ms, the fused op 191 → 40 ms, the FCN-R18-d8 512² bench
/// ~6 % less wall time, ResNet-32, OCRNet/SegFormer/UPerNet and a Fashion-MNIST epoch unchanged
/// within noise, peak RSS within 2 % (`docs/results/glibc-mmap-max-2026-12-07.txt`). A `GLIBC_TUNABLES`
/// with malloc settings wins.
#[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
fn retain_freed_memory() {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    // SAFETY: mallopt only sets malloc's parameters; it runs first thing in main, before any
    // other thread exists, and a refused value (0 returned) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

#[cfg(not(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu")))]
fn retain_freed_memory() {}

/// Semantic Anchor Regularization (SAR): reference verifier, training and evaluation.
#[derive(Parser)]
#[command(name = "sar", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute one SAR step in f64 from a safetensors case (see `sar_train::reference`), to
    /// check another SAR implementation against this one.
    Reference(ReferenceArgs),
    /// Time one SAR step (forward + backward) per backend beside a memory copy, at
    /// Cityscapes/HRNet scale (seg) and CIFAR scale (cls).
    Bench(BenchArgs),
    /// Train baseline and SAR on embedded long-tailed data and print a table over several
    /// seeds: `--task cls` (default; digits, small CNN, under a minute): overall, head, medium
    /// and tail accuracy; `--task seg` (glyph mosaic, FCN on a dilated ResNet-18, a few
    /// minutes): per-class IoU, mIoU and head/body/tail.
    Demo(DemoArgs),
    /// Train a classifier or a segmenter with or without SAR from a TOML config (see
    /// `configs/`).
    Train(TrainArgs),
    /// Evaluate a checkpoint on its configuration's test set.
    Eval(EvalArgs),
    /// Train several arms (config variants, e.g. SAR's ablations or the baselines CR / CAR /
    /// prototypes) over several seeds and print a table with paired differences against the
    /// first arm. Finished runs are read, interrupted ones resumed.
    Compare(CompareArgs),
    /// Write the example reference case (the one in examples/reference/) to a file.
    ReferenceExample(ReferenceExampleArgs),
}

/// Arguments of `sar compare`.
#[derive(clap::Args)]
struct CompareArgs {
    /// The base configuration file.
    #[arg(long)]
    config: PathBuf,
    /// An arm: `NAME[:section.key=value,…]` (TOML values, as `--set`); repeatable, the first is
    /// the reference. `--arm sar` alone is the base config.
    #[arg(long = "arm", value_name = "NAME[:KEY=VALUE,...]", required = true)]
    arms: Vec<String>,
    /// Seeds (`run.seed`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Override a config value in every arm (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Folder of the run folders and the table (default `runs/compare`).
    #[arg(long, default_value = "runs/compare")]
    output: PathBuf,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
    /// Delete every arm's earlier run in the output folder and train it again (runs of the
    /// same config are otherwise read or resumed, and runs of another config refused).
    #[arg(long)]
    overwrite: bool,
}

fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let arms = args
        .arms
        .iter()
        .map(|a| sar_train::compare::Arm::parse(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = sar_train::compare::CompareSpec {
        config: sar_train::compare::BaseConfig::File(args.config),
        arms,
        seeds: args.seeds,
        common: args.overrides,
        output: args.output.clone(),
        verbose: !args.quiet,
        overwrite: args.overwrite,
    };
    let c = sar_train::compare::compare(&spec, &mut |run| eprintln!("{}", run.line()))?;
    print!("{}", sar_train::compare::markdown(&c));
    println!(
        "\nwritten: {}/compare.{{json,md}}, compare-per-class.png",
        args.output.display()
    );
    Ok(())
}

/// Arguments of `sar reference`.
#[derive(clap::Args)]
struct ReferenceArgs {
    /// Input tensors: anchor_logits, embedded_anchors, semantic_anchors (optional),
    /// initialized (optional), features, labels.
    #[arg(long)]
    input: PathBuf,
    /// Options JSON (tau, delta, alpha, lambda_aux, lambda_p2a, ignore_index, gate,
    /// weights); every key optional.
    #[arg(long)]
    options: Option<PathBuf>,
    /// Output safetensors file (written atomically, only on success).
    #[arg(long)]
    output: PathBuf,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

/// Arguments of `sar bench`.
#[derive(clap::Args)]
struct BenchArgs {
    /// Which workloads: seg, cls, resnet32, resnet18 (ImageNet stem, batch 16 of 224², 200
    /// classes, candle and dfdx; not in all), seg-step (FCN on a dilated ResNet-18, batch 2,
    /// 512², candle and dfdx), seg-models (OCRNet, SegFormer-B0, UPerNet-Swin-T, batch 2, 256²), or all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// A Python with PyTorch: resnet32, seg-step and seg-models then also time the project's
    /// PyTorch peer of the same step (tests/torch/resnet32_step_peer.py, seg_step_peer.py,
    /// seg_models_step_peer.py, kept running), interleaved with ours, and print ours / PyTorch.
    #[arg(long, value_name = "PYTHON")]
    torch: Option<PathBuf>,
    /// Timed repetitions per variant (median reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time only this library's steps in resnet32, resnet18 and seg-step (default: candle and
    /// dfdx), so that the process's CPU time and peak memory, printed at the end, are its own.
    #[arg(long, value_enum)]
    backend: Option<Backend>,
}

/// Arguments of `sar demo`.
#[derive(clap::Args)]
struct DemoArgs {
    /// Classification or segmentation.
    #[arg(long, value_enum, default_value = "cls")]
    task: sar_train::demo::DemoTask,
    /// Number of seeds (runs per arm; default 5 for cls, 2 for seg).
    #[arg(long)]
    seeds: Option<u64>,
    /// Training epochs per run (cls).
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Training iterations per run (seg).
    #[arg(long, default_value_t = 800)]
    iters: usize,
    /// Output folder (runs, report.json, plots; default runs/demo or runs/demo-seg).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write the full report (every run, per-class accuracy) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Delete an earlier demo's runs in the output folder and train them again (a demo with
    /// the same settings is otherwise read or continued, one with others refused).
    #[arg(long)]
    overwrite: bool,
}

/// Arguments of `sar train`.
#[derive(clap::Args)]
struct TrainArgs {
    /// The configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: `--set optim.lr=0.05` (repeatable; TOML values).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Output folder (same as `--set run.output=...`).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Continue from a checkpoint file, or from the newest checkpoint of a run folder.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start a new run from another run's weights only (a checkpoint file or a run folder's
    /// newest; same as `--set stage.init_from=...`), e.g. a second stage on a first.
    #[arg(long, value_name = "CHECKPOINT_OR_RUN")]
    init_from: Option<PathBuf>,
    /// Start over in an output folder that holds a run: delete that run's files first
    /// (with `--resume`: the checkpoints after the one resumed, or another run's files).
    #[arg(long)]
    overwrite: bool,
    /// Testing the stop on signals: sleep this long in every step.
    #[arg(long, hide = true)]
    debug_step_delay_ms: Option<u64>,
    /// Debug: write the initial state and every rendered batch to this folder, so another
    /// implementation can replay the run (`tests/torch/train_mirror.py`).
    #[arg(long, value_name = "DIR")]
    debug_dump: Option<PathBuf>,
    /// Debug, with --debug-dump: write the data once and each step's random choices
    /// (`plan.jsonl`, a few kB a step) instead of every batch, so a whole run can be replayed
    /// (`tests/torch/train_mirror.py --end-to-end`).
    #[arg(long, requires = "debug_dump")]
    debug_dump_plan: bool,
    /// Also write the final report (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Tensor library (same as `--set run.backend=...`): candle, or dfdx (classification,
    /// FCN / DeepLabV3 on the ResNet V1c, FCN / OCRNet on HRNetV2; the others need candle).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
}

/// Arguments of `sar eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// The checkpoint file (`.../checkpoints/step-*.safetensors`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Also write the evaluation (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Evaluate on this tensor library instead of the one that trained the checkpoint.
    #[arg(long, value_enum)]
    backend: Option<Backend>,
}

/// Arguments of `sar reference-example`.
#[derive(clap::Args)]
struct ReferenceExampleArgs {
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
}

fn main() {
    retain_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        if let Some(stop) = e.downcast_ref::<sar_train::run::stop::Interrupted>() {
            eprintln!("{stop}");
            eprintln!(
                "continue with the same command and `--resume {}`",
                stop.folder.display()
            );
            std::process::exit(stop.exit_code());
        }
        // One line: the whole context chain.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--backend` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Backend {
    /// candle.
    Candle,
    /// dfdx.
    Dfdx,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Candle => "candle",
            Backend::Dfdx => "dfdx",
        }
    }
    fn kind(self) -> sar_train::config::BackendKind {
        match self {
            Backend::Candle => sar_train::config::BackendKind::Candle,
            Backend::Dfdx => sar_train::config::BackendKind::Dfdx,
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Reference(args) => reference(args),
        Command::Bench(args) => bench(args),
        Command::Demo(args) => demo(args),
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Compare(args) => compare(args),
        Command::ReferenceExample(args) => reference_example(args),
    }
}

fn reference(
    ReferenceArgs {
        input,
        options,
        output,
        quiet,
    }: ReferenceArgs,
) -> anyhow::Result<()> {
    let out = sar_train::reference::run_files(&input, options.as_deref(), &output)?;
    if !quiet {
        let r = out.report;
        println!(
            "L_aux  = {:.10}  ({} anchor(s) at or below tau)",
            r.loss_aux, r.uncertain
        );
        println!(
            "gate   = {}  ({} anchor row(s) updated)",
            if r.gate_passed { "passed" } else { "failed" },
            r.updated_classes
        );
        println!("L_p2a  = {:.10}  (|Omega| = {})", r.loss_p2a, r.valid);
        println!("L_SAR  = {:.10}", r.loss_sar);
        println!("wrote {}", output.display());
    }
    Ok(())
}

fn bench(
    BenchArgs {
        workload,
        reps,
        json,
        torch,
        backend,
    }: BenchArgs,
) -> anyhow::Result<()> {
    use sar_train::bench::{run_resnet32, run_seg_step, run_workload, table, Workload};
    let backend = backend.map(Backend::kind);
    let (workloads, resnet, seg_step, seg_models) = match workload.as_str() {
        "seg" => (vec![Workload::seg()], false, false, false),
        "cls" => (vec![Workload::cls()], false, false, false),
        "resnet32" => (vec![], true, false, false),
        "resnet18" => {
            let r = sar_train::bench::run_resnet18(reps.max(1), 16, backend)?;
            print!("{}", sar_train::bench::model_step_table("model step", &r));
            print_usage(None);
            return write_json(json.as_deref(), &r);
        }
        "seg-step" => (vec![], false, true, false),
        "seg-models" => (vec![], false, false, true),
        "all" => (vec![Workload::seg(), Workload::cls()], true, true, true),
        other => anyhow::bail!(
            "unknown workload `{other}` (seg, cls, resnet32, resnet18, seg-step, seg-models or all)"
        ),
    };
    anyhow::ensure!(
        torch.is_none() || resnet || seg_step || seg_models,
        "--torch times the PyTorch peers of resnet32, seg-step and seg-models (or all)"
    );
    let peer_header = |h: Option<serde_json::Value>| {
        if let Some(h) = h {
            let torch = h["torch"].as_str().unwrap_or("?");
            println!("PyTorch peer: torch {torch}, {} threads", h["threads"]);
        }
    };
    let mut peer_usage = None;
    let mut rows = Vec::new();
    for w in &workloads {
        rows.extend(run_workload(w, reps.max(1))?);
    }
    if !rows.is_empty() {
        print!("{}", table(&rows));
    }
    if resnet {
        let (r, header) = run_resnet32(reps.max(1), torch.as_deref(), backend)?;
        print!("{}", sar_train::bench::model_step_table("model step", &r));
        peer_usage = header.as_ref().map(|h| h["rusage"].clone());
        peer_header(header);
        rows.extend(r);
    }
    if seg_step {
        let (r, header) = run_seg_step(reps.max(1), torch.as_deref(), backend)?;
        print!(
            "{}",
            sar_train::bench::model_step_table("segmentation step", &r)
        );
        peer_usage = header.as_ref().map(|h| h["rusage"].clone());
        peer_header(header);
        rows.extend(r);
    }
    if seg_models {
        use sar_train::bench::seg_models::{run_seg_models, seg_models_table};
        let (r, header) = run_seg_models(reps.max(1), torch.as_deref(), backend)?;
        print!("{}", seg_models_table(&r, header.as_ref()));
        peer_usage = header.as_ref().map(|h| h["rusage"].clone());
        rows.extend(r);
    }
    print_usage(peer_usage);
    write_json(json.as_deref(), &rows)
}

/// The benchmark process's CPU time, system-time share and peak memory (everything it ran,
/// setup included), and the PyTorch peer's as it reported them (of the last workload with one).
fn print_usage(peer: Option<serde_json::Value>) {
    use sar_train::bench::Rusage;
    if let Some(ours) = Rusage::of_this_process() {
        println!("this process: {}", ours.line());
    }
    if let Some(p) = peer.and_then(|v| serde_json::from_value::<Rusage>(v).ok()) {
        println!("PyTorch peer: {}", p.line());
    }
}

/// `--json PATH`: the benchmark's rows, written atomically.
fn write_json(path: Option<&Path>, rows: &[sar_train::bench::BenchRow]) -> anyhow::Result<()> {
    if let Some(path) = path {
        let bytes = serde_json::to_vec_pretty(rows)?;
        sar_train::tensorio::write_atomic(path, &bytes)?;
    }
    Ok(())
}

fn demo(
    DemoArgs {
        task,
        seeds,
        epochs,
        iters,
        output,
        report,
        overwrite,
    }: DemoArgs,
) -> anyhow::Result<()> {
    use sar_train::demo::{DemoConfig, DemoTask};
    let base = match task {
        DemoTask::Cls => DemoConfig::default(),
        DemoTask::Seg => DemoConfig::segmentation(),
    };
    let seeds = seeds.unwrap_or(base.seeds.len() as u64);
    anyhow::ensure!(
        seeds >= 1 && epochs >= 1 && iters >= 1,
        "--seeds, --epochs and --iters must be at least 1"
    );
    let cfg = DemoConfig {
        seeds: (0..seeds).collect(),
        epochs,
        iters,
        output: output.unwrap_or(base.output.clone()),
        overwrite,
        ..base
    };
    let r = sar_train::demo::run_demo(&cfg, &mut |run| eprintln!("{}", run.line()))?;
    println!("\n{}", sar_train::demo::summary(&r));
    println!(
        "runs, compare.{{md,json}}, report.json and plots in {}",
        cfg.output.display()
    );
    if let Some(path) = report {
        sar_train::tensorio::write_atomic(&path, &serde_json::to_vec_pretty(&r)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn train(
    TrainArgs {
        config,
        overrides,
        output,
        resume,
        init_from,
        overwrite,
        debug_step_delay_ms,
        debug_dump,
        debug_dump_plan,
        report,
        quiet,
        backend,
    }: TrainArgs,
) -> anyhow::Result<()> {
    let mut overrides = overrides;
    if let Some(b) = backend {
        overrides.push(format!("run.backend=\"{}\"", b.name()));
    }
    if let Some(o) = output {
        overrides.push(format!(
            "run.output={}",
            toml_string(&o.display().to_string())
        ));
    }
    if let Some(i) = init_from {
        overrides.push(format!(
            "stage.init_from={}",
            toml_string(&i.display().to_string())
        ));
    }
    let cfg = sar_train::config::load(&config, &overrides)?;
    let opts = sar_train::train::TrainOptions {
        resume,
        progress: !quiet,
        verbose: !quiet,
        overwrite,
        stop: Some(sar_train::run::stop::StopRequest::on_signals()?),
        step_delay: debug_step_delay_ms.map(std::time::Duration::from_millis),
        dump: debug_dump,
        dump_plan: debug_dump_plan,
        ..Default::default()
    };
    let r = sar_train::train::train(&cfg, &opts)?;
    println!(
        "{}: {}  ({} steps, {:.1} s{})",
        r.name,
        r.eval.summary(),
        r.steps,
        r.wall_seconds,
        match r.gate_first_pass {
            Some(s) if r.sar => format!(
                ", SAR gate first passed at step {s}, then on {:.0}% of steps",
                100.0 * r.gate_pass_rate
            ),
            _ if r.sar => ", SAR gate never passed".into(),
            _ => String::new(),
        }
    );
    println!("outputs in {}", cfg.run.output.display());
    if let Some(p) = report {
        sar_train::tensorio::write_atomic(&p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}

fn eval(
    EvalArgs {
        checkpoint,
        report,
        backend,
    }: EvalArgs,
) -> anyhow::Result<()> {
    let (cfg, e) = sar_train::train::eval_checkpoint(&checkpoint, backend.map(Backend::kind))?;
    println!(
        "{} ({}): {}",
        cfg.run.name,
        checkpoint.display(),
        e.summary()
    );
    if let Some(p) = report {
        sar_train::tensorio::write_atomic(&p, serde_json::to_string_pretty(&e)?.as_bytes())?;
    }
    Ok(())
}

fn reference_example(ReferenceExampleArgs { output }: ReferenceExampleArgs) -> anyhow::Result<()> {
    let bytes =
        sar_train::tensorio::serialize(&sar_train::reference::example_case(), Default::default())
            .map_err(|e| anyhow::anyhow!(e))?;
    sar_train::tensorio::write_atomic(&output, &bytes).context("writing the example case")?;
    println!("wrote {}", output.display());
    Ok(())
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}
