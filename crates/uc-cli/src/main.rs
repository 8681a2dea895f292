//! `uc`: the command-line front end. Thin: parse arguments, call the library
//! crates, print. Exit codes: 0 success, 1 failure, 2 usage error.

mod cmd_bench;
mod cmd_compress;
mod cmd_eval;
mod cmd_export;
mod cmd_import;
mod cmd_inspect;
mod cmd_run;
mod cmd_serve;
mod cmd_verify;
mod output;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

// Forward passes allocate and free buffers of hundreds of MB per window; glibc returns
// those to the OS and the kernel zeroes them again on the next touch (a quarter of eval
// time in profiles). mimalloc, told never to purge and to use large pages, keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc v2 header that libmimalloc-sys builds
/// (the crate does not name it); -1 means never return freed memory to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn tune_allocator() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table; both
    // options are documented as settable at run time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 1);
    }
}

/// Compress transformer language models to ~5 bits per weight, and prove it.
#[derive(Parser)]
#[command(name = "uc", version, about, long_about = None, after_help = "\
Examples:
  uc import gguf SmolLM2-135M-Instruct.Q4_1.gguf -o assets/smollm2-135m
  uc compress assets/smollm2-135m -o packs/smollm2-rtn5 --method rtn --bits 5
  uc verify packs/smollm2-rtn5
  uc eval packs/smollm2-rtn5 --against assets/smollm2-135m --sotu assets/sotu --json
  uc serve packs/smollm2-rtn5 --port 8080

Exit codes: 0 success, 1 failure, 2 usage error.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Convert another checkpoint format to a Hugging Face directory.
    #[command(subcommand)]
    Import(cmd_import::Import),
    /// Compress a checkpoint into a pack.
    Compress(cmd_compress::CompressArgs),
    /// Check every byte and every reconstructed tensor of a pack.
    Verify(cmd_verify::VerifyArgs),
    /// Show what a pack holds: bits per weight, codecs, errors, provenance.
    Inspect(cmd_inspect::InspectArgs),
    /// Perplexity of a model on text, and KL / top-1 against a reference.
    Eval(cmd_eval::EvalArgs),
    /// Generate text from a pack or checkpoint (KV cache, streamed output).
    Run(cmd_run::RunArgs),
    /// Time to first token, prefill / decode tokens per second, peak memory.
    Bench(cmd_bench::BenchArgs),
    /// Write a pack as a dense Hugging Face checkpoint or a GGUF file.
    Export(cmd_export::ExportArgs),
    /// Serve a pack over an OpenAI-compatible HTTP API (chat and text completions).
    Serve(cmd_serve::ServeArgs),
}

fn main() -> ExitCode {
    tune_allocator();
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
        Command::Compress(args) => cmd_compress::run(args),
        Command::Inspect(args) => cmd_inspect::run(args),
        Command::Run(args) => cmd_run::run(args),
        Command::Bench(args) => cmd_bench::run(args),
        Command::Serve(args) => cmd_serve::run(args),
        Command::Export(args) => cmd_export::run(args),
        Command::Verify(args) => match cmd_verify::run(args) {
            // A FAIL is reported on stdout; the exit code says it.
            Ok(false) => return ExitCode::from(1),
            other => other.map(|_| ()),
        },
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
