//! `uc`: the command-line front end. Thin: parse arguments, call the library
//! crates, print. Exit codes: 0 success, 1 failure, 2 usage error.

mod cmd_eval;
mod cmd_import;
mod output;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Compress transformer language models to ~5 bits per weight, and prove it.
#[derive(Parser)]
#[command(name = "uc", version, about, long_about = None, after_help = "\
Examples:
  uc import gguf SmolLM2-135M-Instruct.Q4_1.gguf -o assets/smollm2-135m
  uc eval assets/smollm2-135m --sotu assets/sotu --windows 32 --json

Exit codes: 0 success, 1 failure, 2 usage error.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert another checkpoint format to a Hugging Face directory.
    #[command(subcommand)]
    Import(cmd_import::Import),
    /// Perplexity of a model on text, and KL / top-1 against a reference.
    Eval(cmd_eval::EvalArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Import(args) => cmd_import::run(args),
        Command::Eval(args) => cmd_eval::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
