//! Imports a GGUF file into a Hugging Face directory and prints the report as JSON
//! with the wall time: `cargo run --release -p uc-model --example import_gguf -- FILE OUT`.

use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf, out] = args.as_slice() else {
        eprintln!("usage: import_gguf FILE.gguf OUT_DIR");
        std::process::exit(2);
    };
    let start = Instant::now();
    let report = uc_model::gguf::import_gguf(Path::new(gguf), Path::new(out))?;
    let mut json = serde_json::to_value(&report)?;
    json["seconds"] = start.elapsed().as_secs_f64().into();
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
