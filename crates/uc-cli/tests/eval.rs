//! `uc eval` end to end on a tiny model.

mod common;
use common::*;

fn eval_json(model: &str, against: Option<&str>, text: &str, threads: &str) -> serde_json::Value {
    let mut args = vec![
        "eval",
        model,
        "--text",
        text,
        "--seq-len",
        "32",
        "--windows",
        "4",
        "--json",
    ];
    if let Some(r) = against {
        args.extend(["--against", r]);
    }
    json_of(&uc(&args, &[("RAYON_NUM_THREADS", threads)]))
}

#[test]
fn eval_digits_are_identical_for_one_and_two_threads() {
    let m = model_with_tokenizer("llama");
    let r = model_with_tokenizer("mistral");
    let text = text_file(m.path());
    let (m, r, t) = (
        m.path().to_str().unwrap(),
        r.path().to_str().unwrap(),
        text.to_str().unwrap(),
    );
    let one = eval_json(m, Some(r), t, "1");
    let two = eval_json(m, Some(r), t, "2");
    assert_eq!(one["threads"], 1);
    assert_eq!(two["threads"], 2);
    for key in ["nll", "ppl", "n_pos", "window_nll", "tokens_sha256"] {
        assert_eq!(one[key], two[key], "{key}");
    }
    for key in ["ref_nll", "kld", "top1", "ppl_ratio", "ref_window_nll"] {
        assert_eq!(one["against"][key], two["against"][key], "{key}");
    }
    // Different random models really do disagree, so the comparison is not vacuous.
    assert!(one["against"]["kld"].as_f64().unwrap() > 0.0);
}

/// SHA-256 (FIPS 180-4), written out here so the test does not share code with uc.
fn sha256_hex(msg: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut m = msg.to_vec();
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend((msg.len() as u64 * 8).to_be_bytes());
    for block in m.chunks_exact(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn receipt_names_the_exact_tokens_and_per_window_nll() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let m = model_with_tokenizer("llama");
    let r = model_with_tokenizer("mistral");
    let text = text_file(m.path());
    let j = eval_json(
        m.path().to_str().unwrap(),
        Some(r.path().to_str().unwrap()),
        text.to_str().unwrap(),
        "2",
    );

    // The character-level tokenizer of `model_with_tokenizer`: ' '..='~' are 1..=95,
    // '\n' is 96. The windows are the first 4 x 32 ids of the file, as u32 LE.
    let body = std::fs::read_to_string(&text).unwrap();
    let ids: Vec<u32> = body
        .bytes()
        .map(|c| {
            if c == b'\n' {
                96
            } else {
                u32::from(c - b' ') + 1
            }
        })
        .collect();
    assert_eq!(j["n_tokens"], ids.len());
    let bytes: Vec<u8> = ids[..4 * 32].iter().flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(j["tokens_sha256"], sha256_hex(&bytes));
    // One more or one fewer token is a different hash.
    assert_ne!(j["tokens_sha256"], sha256_hex(&bytes[..bytes.len() - 4]));

    // Per-window means, weighted by their positions, give the reported means.
    let n_pos = j["n_pos"].as_u64().unwrap() as f64;
    for (arr, total) in [
        (&j["window_nll"], &j["nll"]),
        (&j["against"]["ref_window_nll"], &j["against"]["ref_nll"]),
    ] {
        let w: Vec<f64> = arr
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(w.len(), 4);
        let weighted: f64 = w.iter().map(|x| x * 31.0).sum::<f64>() / n_pos;
        let total = total.as_f64().unwrap();
        assert!(
            (weighted - total).abs() <= 1e-12 * total.abs().max(1.0),
            "{weighted} vs {total}"
        );
        // Windows really differ, so the array is not one number repeated.
        assert!(w.iter().any(|x| *x != w[0]));
    }
    // Without a reference there is no reference array.
    let alone = eval_json(
        m.path().to_str().unwrap(),
        None,
        text.to_str().unwrap(),
        "1",
    );
    assert_eq!(alone["window_nll"], j["window_nll"]);
    assert!(alone["against"].is_null());
}

#[test]
fn a_model_against_itself_has_ratio_one_and_zero_kl() {
    let m = model_with_tokenizer("qwen2");
    let text = text_file(m.path());
    let p = m.path().to_str().unwrap();
    let j = eval_json(p, Some(p), text.to_str().unwrap(), "2");
    assert_eq!(j["against"]["ppl_ratio"], 1.0);
    assert_eq!(j["against"]["kld"], 0.0);
    assert_eq!(j["against"]["top1"], 1.0);
    assert_eq!(j["n_pos"], 4 * 31);
}

#[test]
fn too_short_text_is_a_clear_failure_with_exit_1() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let out = uc(
        &[
            "eval",
            m.path().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--windows",
            "1000",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tokens"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(uc(&["eval"], &[]).status.code(), Some(2));
    assert_eq!(uc(&["frobnicate"], &[]).status.code(), Some(2));
    let help = uc(&["eval", "--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples"));
}

#[test]
fn missing_model_directory_is_named() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    let out = uc(
        &[
            "eval",
            "/nonexistent/model",
            "--text",
            text.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}
