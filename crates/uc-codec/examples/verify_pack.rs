//! Verifies a pack: `verify_pack PACK [--threads N] [--json]`.
//! Prints `VERIFY: PASS` or `VERIFY: FAIL` and each failure; `--json` prints the receipt.
//! Exit codes: 0 pass, 1 fail, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut threads, mut json) = (None::<PathBuf>, 0usize, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--threads" => match args.next().and_then(|t| t.parse().ok()) {
                Some(t) => threads = t,
                None => return usage(),
            },
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(a.into()),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else { return usage() };
    let report = uc_codec::pack::verify_dir(&dir, threads);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot serialize report: {e}"),
        }
    } else {
        for f in &report.failures {
            println!("  {}: {}", f.subject, f.problem);
        }
        let mb = report.bytes_hashed as f64 / 1e6;
        println!(
            "VERIFY: {} ({} files, {} tensors, {mb:.1} MB in {:.2} s, {:.0} MB/s, kernel {}, {} threads)",
            if report.pass { "PASS" } else { "FAIL" },
            report.files.len(),
            report.tensors.len(),
            report.seconds,
            mb / report.seconds.max(1e-9),
            report.host.kernel.name(),
            report.host.threads
        );
    }
    if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: verify_pack PACK [--threads N] [--json]");
    ExitCode::from(2)
}
