//! A pack directory built from fuzz bytes -- `u32 LE manifest length, manifest.json,
//! tensors/block_0000.safetensors` -- opened, verified (every tensor decoded and
//! reconstructed) and read tensor by tensor. Seeds: `cargo run --example make_seeds`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("uc-fuzz-pack-{}", std::process::id()));
        std::fs::create_dir_all(d.join("tensors")).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (manifest, container) = rest.split_at(len);
    let d = dir();
    std::fs::write(d.join("manifest.json"), manifest).unwrap();
    std::fs::write(d.join("tensors/block_0000.safetensors"), container).unwrap();
    let Ok(pack) = uc_format::Pack::open(d) else {
        return;
    };
    let report = uc_codec::pack::verify_pack(&pack, 1);
    let _ = serde_json::to_string(&report).unwrap();
    for t in &pack.manifest().tensors {
        let _ = uc_codec::pack::read_quant_tensor(&pack, &t.name);
        let _ = uc_codec::pack::reconstruct_tensor(&pack, &t.name, uc_codec::Kernel::select(false));
    }
});
