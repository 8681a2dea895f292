//! Arbitrary bytes as a container: parse, then touch every entry.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = uc_format::Container::from_bytes(std::path::Path::new("fuzz"), data.to_vec()) {
        for n in c.names() {
            let e = c.entry(n).expect("listed entries exist");
            assert!(e.data.len() <= data.len());
        }
    }
});
