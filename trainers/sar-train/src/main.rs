//! The `sar` command-line program.
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    Reference {
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
    },
    /// Write the example reference case (the one in examples/reference/) to a file.
    ReferenceExample {
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line: the whole context chain.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Reference {
            input,
            options,
            output,
            quiet,
        } => {
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
        Command::ReferenceExample { output } => {
            let bytes = sar_train::tensorio::serialize(
                &sar_train::reference::example_case(),
                Default::default(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            sar_train::tensorio::write_atomic(&output, &bytes)
                .context("writing the example case")?;
            println!("wrote {}", output.display());
            Ok(())
        }
    }
}
