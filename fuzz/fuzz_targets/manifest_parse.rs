//! Manifest bytes -> typed manifest or a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = uc_format::Manifest::from_json_bytes(std::path::Path::new("fuzz"), data);
});
