//! Helpers shared by the CLI integration tests: a tiny real model (a golden fixture
//! of uc-model) with a character-level tokenizer, and a runner for the `uc` binary.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The uc-model fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../uc-model/tests/fixtures")
        .join(name)
}

/// A copy of fixture `name` plus a character-level tokenizer.json (ids < 128).
pub fn model_with_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "io.safetensors" {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    for (i, c) in (b' '..=b'~').chain([b'\n']).enumerate() {
        vocab.insert((c as char).to_string(), (i + 1).into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

/// A text file of a few hundred characters.
pub fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let s = "The quick brown fox jumps over the lazy dog 0123456789 times.\n".repeat(12);
    std::fs::write(&p, s).unwrap();
    p
}

/// Runs `uc ARGS` with extra environment variables.
pub fn uc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uc"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Stdout as JSON, with the stderr shown on failure.
pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "uc failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An RTN pack (no calibration needed) of the checkpoint `model`, written to `dir`/pack.
pub fn rtn_pack(model: &Path, dir: &Path) -> PathBuf {
    let pack = dir.join("pack");
    let (m, p) = (model.to_str().unwrap(), pack.to_str().unwrap());
    let out = uc(&["compress", m, "-o", p, "--method", "rtn"], &[]);
    assert!(
        out.status.success(),
        "compress: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pack
}

/// Every position's logits of a fixed 24-token input.
pub fn logits(model: &Path) -> Vec<f32> {
    let loader = uc_runtime::weights::open(model, uc_runtime::Verify::Full).unwrap();
    let vocab = loader.config().vocab_size as u32;
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % vocab).collect();
    let mut dec = uc_runtime::Decoder::new(
        loader,
        uc_runtime::DecoderOptions {
            capacity: 32,
            stream_layers: false,
        },
    )
    .unwrap();
    dec.forward(&ids, uc_runtime::Logits::All).unwrap()
}

/// Rewrites `dir`/model.safetensors without tensor `drop` (offsets recomputed, so the
/// file stays valid: only the tensor is missing).
pub fn drop_tensor(dir: &Path, drop: &str) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    assert!(header.contains_key(drop), "{drop} not in the fixture");
    let mut entries: Vec<(String, serde_json::Value)> = header
        .into_iter()
        .filter(|(k, _)| k != drop && k != "__metadata__")
        .collect();
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
    let (mut out_header, mut body) = (serde_json::Map::new(), Vec::new());
    for (k, mut v) in entries {
        let (a, b) = (
            v["data_offsets"][0].as_u64().unwrap() as usize,
            v["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let start = body.len();
        body.extend_from_slice(&data[a..b]);
        v["data_offsets"] = serde_json::json!([start, body.len()]);
        out_header.insert(k, v);
    }
    let mut h = serde_json::to_vec(&out_header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(body);
    std::fs::write(&p, file).unwrap();
}

/// Sets `key` of `dir`/config.json to `value`; `Null` removes the key.
pub fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    match value {
        serde_json::Value::Null => {
            cfg.as_object_mut().unwrap().remove(key);
        }
        v => cfg[key] = v,
    }
    std::fs::write(&p, cfg.to_string()).unwrap();
}

/// The stdout of a `uc` run that must have succeeded (its stderr in the failure).
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "uc failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The small calibrated compress the end-to-end tests share: `uc compress MODEL -o PACK
/// --calib TEXT --calib-seqs SEQS --calib-len LEN --group 32` and `extra`, under `env`.
pub fn compress_small(
    model: &Path,
    pack: &Path,
    text: &Path,
    (seqs, len): (&str, &str),
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut args = vec![
        "compress",
        model.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--calib",
        text.to_str().unwrap(),
        "--calib-seqs",
        seqs,
        "--calib-len",
        len,
        "--group",
        "32",
    ];
    args.extend_from_slice(extra);
    uc(&args, env)
}

/// `uc eval MODEL --against REF --text TEXT` on 4 windows of 32 tokens with `threads`
/// threads: its JSON.
pub fn eval_small(model: &Path, against: &Path, text: &Path, threads: &str) -> Value {
    json_of(&uc(
        &[
            "eval",
            model.to_str().unwrap(),
            "--against",
            against.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--seq-len",
            "32",
            "--windows",
            "4",
            "--json",
        ],
        &[("RAYON_NUM_THREADS", threads)],
    ))
}

/// `uc run MODEL -p "The quick brown fox" --max-tokens 16` and `extra`: its stdout (the
/// run must succeed).
pub fn run_text(model: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        model.to_str().unwrap(),
        "-p",
        "The quick brown fox",
        "--max-tokens",
        "16",
    ];
    args.extend_from_slice(extra);
    ok_stdout(&uc(&args, &[]))
}

/// `uc verify PACK` prints `VERIFY: PASS`.
pub fn verify_passes(pack: &Path) {
    let v = uc(&["verify", pack.to_str().unwrap()], &[]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.starts_with("VERIFY: PASS"), "{out}");
}

/// `uc compress` of a broken copy fails with exit 1, its stderr naming every string of
/// `names`, and leaves no pack behind.
pub fn refused(m: &Path, names: &[&str]) {
    let text = text_file(m);
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    let out = compress_small(m, &pack, &text, ("6", "40"), &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for n in names {
        assert!(err.contains(n), "stderr does not name {n:?}: {err}");
    }
    assert!(
        !pack.join("manifest.json").exists(),
        "a pack was written: {err}"
    );
    // The runtime refuses it too, by the same names.
    let r = uc(
        &["run", m.to_str().unwrap(), "-p", "x", "--max-tokens", "2"],
        &[],
    );
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    for n in names {
        assert!(err.contains(n), "run's stderr does not name {n:?}: {err}");
    }
}

/// A running `uc serve`; killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub model: String,
    pub fingerprint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `uc serve PACK --port 0 --json --threads 1 EXTRA` and reads its first line.
pub fn serve(pack: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uc"))
        .args(["serve", pack.to_str().unwrap(), "--port", "0", "--json"])
        .args(["--threads", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("uc serve did not start: {err}");
    }
    let v: Value = serde_json::from_str(&line).unwrap();
    Server {
        url: v["listening"].as_str().unwrap().to_string(),
        model: v["model"].as_str().unwrap().to_string(),
        fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
        child,
    }
}

/// `curl -i` a request; returns (status, headers lowercased, body).
pub fn curl(url: &str, body: Option<&str>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "-N", "--max-time", "60", url]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd.output().expect("curl must be installed");
    assert!(out.status.success(), "curl failed: {:?}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, head.to_lowercase(), body.to_string())
}

/// POSTs `body` to `route`; (status, JSON body or null).
pub fn post(s: &Server, route: &str, body: &Value) -> (u16, Value) {
    let (status, _, b) = curl(&format!("{}{route}", s.url), Some(&body.to_string()));
    (status, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// Asserts two `uc eval --json` outputs of one run on 1 and 2 threads agree digit for
/// digit (`what` names the case in a failure).
pub fn assert_same_eval_on_1_and_2_threads(one: &Value, two: &Value, what: &str) {
    assert_eq!(
        (one["threads"].as_u64(), two["threads"].as_u64()),
        (Some(1), Some(2)),
        "{what}"
    );
    for key in ["nll", "ppl", "n_pos", "window_nll", "tokens_sha256"] {
        assert_eq!(one[key], two[key], "{what} {key}");
    }
    for key in ["ref_nll", "kld", "top1", "ppl_ratio", "ref_window_nll"] {
        assert_eq!(one["against"][key], two["against"][key], "{what} {key}");
    }
}
