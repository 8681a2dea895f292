//! `uc serve` end to end: a pack of a tiny fixture model (character-level tokenizer, so
//! a prompt of n characters is n tokens and usage counts can be checked by hand) served
//! on a free port, driven with curl and with the official OpenAI Python client.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A chat template in the style of tokenizer_config.json's, over characters the
/// fixture's tokenizer knows (rendered by the server with minijinja).
const TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// What TEMPLATE renders for `msgs`, written out by hand.
fn rendered(msgs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (role, content) in msgs {
        s += &format!("{role}: {}\n", content.trim());
    }
    s + "assistant:"
}

/// A pack of the llama fixture with a chat template, in `dir`/pack. The config is
/// changed to a 4096-position context (rotary positions, nothing learned per position)
/// and no end-of-sequence token, so generations run to `max_tokens` and long streams
/// exist to be abandoned.
fn pack(dir: &Path) -> PathBuf {
    let m = model_with_tokenizer("llama");
    let cfg_path = m.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = json!(4096);
    cfg.as_object_mut().unwrap().remove("eos_token_id");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::remove_file(m.path().join("generation_config.json")).unwrap();
    std::fs::write(
        m.path().join("tokenizer_config.json"),
        json!({"chat_template": TEMPLATE}).to_string(),
    )
    .unwrap();
    rtn_pack(m.path(), dir)
}

fn chat_body(s: &Server, content: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": s.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 20,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The `data:` payloads of an SSE body, checking the framing on the way: every event is
/// one `data: ` line followed by a blank line.
fn sse_payloads(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let lines: Vec<&str> = event.lines().collect();
        assert_eq!(lines.len(), 1, "one line per event: {event:?}");
        out.push(
            lines[0]
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {:?}", lines[0]))
                .to_string(),
        );
    }
    out
}

#[test]
fn curl_chat_and_completions_report_usage_fingerprint_and_models() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &[]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(d.path().join("pack/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(s.fingerprint, manifest["fingerprint"].as_str().unwrap());

    let (st, head, body) = curl(&format!("{}/v1/models", s.url), None);
    assert_eq!(st, 200);
    assert!(head.contains(&format!("x-uc-pack-fingerprint: {}", s.fingerprint)));
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], s.model.as_str());
    assert_eq!(models["data"][0]["fingerprint"], s.fingerprint.as_str());

    let (st, _, body) = curl(&format!("{}/health", s.url), None);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );

    // Chat: the prompt is the template's rendering, one token per character.
    let (st, head, body) = curl(
        &format!("{}/v1/chat/completions", s.url),
        Some(&chat_body(&s, "  Hello there ", json!({"max_tokens": 9})).to_string()),
    );
    assert_eq!(st, 200, "{body}");
    assert!(head.contains(&format!("x-uc-pack-fingerprint: {}", s.fingerprint)));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["system_fingerprint"], s.fingerprint.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let prompt_tokens = rendered(&[("user", "Hello there")]).chars().count();
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], prompt_tokens);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        prompt_tokens as u64 + completion
    );
    match v["choices"][0]["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(completion, 9),
        "stop" => assert!(completion < 9),
        other => panic!("finish_reason {other}"),
    }

    // Completions: raw text prompt.
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"model": s.model, "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 19);
    assert!(v["choices"][0]["text"].is_string());
    // And the same text the solo `uc run` greedy path gives for the same prompt: a
    // different code path over the same pack.
    let run = uc(
        &[
            "run",
            d.path().join("pack").to_str().unwrap(),
            "-p",
            "The quick brown fox",
            "--max-tokens",
            "5",
        ],
        &[],
    );
    assert!(run.status.success());
    let run_text = String::from_utf8(run.stdout).unwrap();
    if v["choices"][0]["finish_reason"] == "length" {
        assert_eq!(
            run_text.trim_end_matches('\n'),
            v["choices"][0]["text"].as_str().unwrap()
        );
    }
}

#[test]
fn streaming_is_sse_framed_ends_with_done_and_equals_the_whole_answer() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &[]);
    let (_, whole) = post(
        &s,
        "/v1/chat/completions",
        &chat_body(&s, "Stream me", json!({})),
    );
    let (st, head, body) = curl(
        &format!("{}/v1/chat/completions", s.url),
        Some(
            &chat_body(
                &s,
                "Stream me",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            )
            .to_string(),
        ),
    );
    assert_eq!(st, 200);
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, chat_text(&whole));
    // The last chunk before [DONE] carries usage and no choices; the one before it the
    // finish reason.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // Completions stream too.
    let (st, _, body) = curl(
        &format!("{}/v1/completions", s.url),
        Some(&json!({"model": s.model, "prompt": "abc", "max_tokens": 6, "temperature": 0, "stream": true}).to_string()),
    );
    assert_eq!(st, 200);
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let (_, whole) = post(
        &s,
        "/v1/completions",
        &json!({"model": s.model, "prompt": "abc", "max_tokens": 6, "temperature": 0}),
    );
    let text: String = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn same_seed_gives_the_same_text_and_stop_sequences_cut_it() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &[]);
    let sampled = |seed: u64| {
        let (st, v) = post(
            &s,
            "/v1/chat/completions",
            &chat_body(
                &s,
                "Tell me",
                json!({"temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": seed, "max_tokens": 24}),
            ),
        );
        assert_eq!(st, 200, "{v}");
        chat_text(&v)
    };
    assert_eq!(sampled(7), sampled(7));
    assert_ne!(
        sampled(7),
        sampled(8),
        "different seeds should sample different text on a random model"
    );

    // A stop sequence taken from inside the greedy answer cuts the answer just before it.
    let (_, v) = post(
        &s,
        "/v1/chat/completions",
        &chat_body(&s, "Stop test", json!({"max_tokens": 24})),
    );
    let full = chat_text(&v);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let expect = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = chat_body(
            &s,
            "Stop test",
            json!({"max_tokens": 24, "stop": [stop], "stream": stream}),
        );
        let (st, _, b) = curl(
            &format!("{}/v1/chat/completions", s.url),
            Some(&body.to_string()),
        );
        assert_eq!(st, 200);
        let text = if stream {
            sse_payloads(&b)
                .iter()
                .filter(|p| *p != "[DONE]")
                .map(|p| serde_json::from_str::<Value>(p).unwrap())
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect::<String>()
        } else {
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            chat_text(&v)
        };
        assert_eq!(text, expect, "stream={stream}");
    }
}

#[test]
fn concurrent_requests_get_the_answers_they_get_alone() {
    let d = tempfile::tempdir().unwrap();
    // Two slots for eight requests: some interleave, the rest wait in the queue.
    let s = serve(&pack(d.path()), &["--max-batch", "2"]);
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let extra = if i % 3 == 2 {
                json!({"temperature": 0.8, "seed": i, "max_tokens": 16 + i})
            } else {
                json!({"max_tokens": 16 + i})
            };
            chat_body(
                &s,
                &format!("Question {i}: what {}?", "why ".repeat(i)),
                extra,
            )
        })
        .collect();
    let alone: Vec<Value> = bodies.iter().map(|b| chat(&s, b)).collect();
    let together = chat_all_at_once(&s, &bodies);
    assert_same_answers(&alone, &together);
}

/// Continuous batching: eight requests with prompts of different lengths (so their
/// sequences sit at different positions) generate together in batched decode steps,
/// and each answer is the one the same request gets alone (greedy and seeded).
#[test]
fn eight_concurrent_requests_batched_together_get_the_answers_they_get_alone() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &["--max-batch", "8"]);
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let n = 120 + 10 * i;
            let extra = if i % 2 == 1 {
                json!({"temperature": 0.9, "top_k": 20, "seed": 100 + i, "max_tokens": n})
            } else {
                json!({"max_tokens": n})
            };
            chat_body(&s, &"ab cd ".repeat(1 + 5 * i), extra)
        })
        .collect();
    // Alone: one request at a time, so every step is that request's own forward.
    let alone: Vec<Value> = bodies.iter().map(|b| chat(&s, b)).collect();
    assert_eq!(health(&s)["peak_batch"], 0, "nothing ran batched yet");
    let together = chat_all_at_once(&s, &bodies);
    let peak = health(&s)["peak_batch"].as_u64().unwrap();
    assert!(
        peak >= 2,
        "the concurrent requests never shared a batched step (largest batch {peak})"
    );
    assert_same_answers(&alone, &together);
}

/// The prompt cache: requests whose prompts share a prefix with one a slot served
/// prefill only the rest, and every answer is the one a server without the cache gives.
/// The model is synthetic (uc-synth's `tiny_wide`: every linear takes the integer
/// prefill GEMM, which the cache needs) with the fixture's character tokenizer.
#[test]
fn prompt_cache_gives_the_answers_of_whole_prefills() {
    let m = model_with_tokenizer("llama");
    let shape = uc_synth::Shape::tiny_wide();
    uc_synth::write_checkpoint(m.path(), &shape, 5, &mut |_| {}).unwrap();
    let _ = std::fs::remove_file(m.path().join("generation_config.json"));
    std::fs::write(
        m.path().join("tokenizer_config.json"),
        json!({"chat_template": TEMPLATE}).to_string(),
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), d.path());
    let cached = serve(&pack, &["--max-batch", "2"]);
    let whole = serve(&pack, &["--max-batch", "2", "--no-prompt-cache"]);
    let long = "Tell me about the sea and the ships that sail on it, ".repeat(2);
    let bodies: Vec<Value> = [
        (format!("{long}in short."), json!({})),
        (format!("{long}in short."), json!({})),
        (
            format!("{long}at length!"),
            json!({"temperature": 0.9, "seed": 4}),
        ),
        ("Something else.".to_string(), json!({})),
        (format!("{long}in short, please."), json!({})),
    ]
    .into_iter()
    .map(|(c, extra)| chat_body(&cached, &c, extra))
    .collect();
    for (i, b) in bodies.iter().enumerate() {
        let (a, w) = (chat(&cached, b), chat(&whole, b));
        assert!(a["choices"][0]["message"]["content"].is_string(), "{a}");
        assert_eq!(a["choices"], w["choices"], "request {i}");
        assert_eq!(a["usage"], w["usage"], "request {i}");
    }
    assert_eq!(health(&whole)["reused_prompt_tokens"], 0);
    let reused = health(&cached)["reused_prompt_tokens"].as_u64().unwrap();
    let isa = uc_runtime::kernels::Isa::detect();
    if uc_runtime::kernels::qgemm::available(isa) {
        // Requests 2 and 3 (and 5) start with an earlier prompt's `user: {long}`.
        assert!(
            reused >= 2 * long.len() as u64,
            "reused {reused} prompt tokens"
        );
    } else {
        assert_eq!(reused, 0, "prefix reuse without the integer GEMM");
    }
}

/// One chat completion's response body.
fn chat(s: &Server, body: &Value) -> Value {
    post(s, "/v1/chat/completions", body).1
}

/// Every body sent at once, one client thread each; the responses in order.
fn chat_all_at_once(s: &Server, bodies: &[Value]) -> Vec<Value> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = bodies.iter().map(|b| sc.spawn(|| chat(s, b))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Each request's message and usage served concurrently equal those served alone.
fn assert_same_answers(alone: &[Value], together: &[Value]) {
    assert_eq!(alone.len(), together.len());
    for (i, (a, t)) in alone.iter().zip(together).enumerate() {
        assert!(a["choices"][0]["message"]["content"].is_string(), "{a}");
        assert_eq!(
            a["choices"][0]["message"], t["choices"][0]["message"],
            "request {i}"
        );
        assert_eq!(a["usage"], t["usage"], "request {i}");
    }
}

fn error_of(s: &Server, route: &str, body: &str) -> (u16, Value) {
    let (st, _, b) = curl(&format!("{}{route}", s.url), Some(body));
    let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    (st, v)
}

#[test]
fn bad_requests_get_openai_error_json_with_4xx_and_the_server_keeps_serving() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &["--ctx-size", "64"]);
    let chat = "/v1/chat/completions";
    let (st, _) = error_of(&s, chat, "{\"model\": ");
    assert_eq!(st, 400);
    let (st, v) = error_of(
        &s,
        chat,
        &chat_body(&s, "hi", json!({"model": "gpt-4"})).to_string(),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let long = "x".repeat(80);
    let (st, v) = error_of(&s, chat, &chat_body(&s, &long, json!({})).to_string());
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    let (st, v) = error_of(
        &s,
        chat,
        &chat_body(&s, "hi", json!({"max_tokens": 60})).to_string(),
    );
    assert_eq!(
        (
            st,
            v["error"]["code"].as_str(),
            v["error"]["param"].as_str()
        ),
        (400, Some("context_length_exceeded"), Some("max_tokens"))
    );
    for (extra, param) in [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": -1}), "top_k"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": "ten"}), ""),
        (json!({"messages": []}), "messages"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
    ] {
        let (st, v) = error_of(&s, chat, &chat_body(&s, "hi", extra.clone()).to_string());
        assert_eq!(st, 400, "{extra}: {v}");
        if !param.is_empty() {
            assert_eq!(v["error"]["param"], param, "{extra}");
        }
    }
    let (st, _) = error_of(
        &s,
        "/v1/completions",
        &json!({"model": s.model, "prompt": ""}).to_string(),
    );
    assert_eq!(st, 400);
    let (st, _) = error_of(&s, "/v1/nothing", "{}");
    assert_eq!(st, 404);
    // Still serving.
    let (st, v) = post(&s, chat, &chat_body(&s, "hi", json!({"max_tokens": 3})));
    assert_eq!(st, 200, "{v}");
}

/// Sends a streaming request over a raw socket, reads until the first token arrives,
/// then drops the connection.
fn start_and_abandon_stream(s: &Server, body: &Value) {
    let addr = s.url.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let b = body.to_string();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "server closed before the first token");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(sock);
}

fn health(s: &Server) -> Value {
    let (_, _, b) = curl(&format!("{}/health", s.url), None);
    serde_json::from_str(&b).unwrap()
}

#[test]
fn a_client_disconnecting_mid_stream_frees_its_slot_and_disturbs_no_one() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &["--max-batch", "2", "--ctx-size", "2048"]);
    let other = chat_body(&s, "I stay connected", json!({"max_tokens": 40}));
    let (_, alone) = post(&s, "/v1/chat/completions", &other);
    // Long generations that would run ~2000 steps if nobody noticed the client left.
    let greedy_forever = chat_body(&s, "Go on", json!({"max_tokens": 1900, "stream": true}));
    let together = std::thread::scope(|sc| {
        let h = sc.spawn(|| post(&s, "/v1/chat/completions", &other).1);
        for _ in 0..3 {
            start_and_abandon_stream(&s, &greedy_forever);
        }
        h.join().unwrap()
    });
    assert_eq!(together["choices"], alone["choices"]);
    // The abandoned jobs are cancelled (not run to 1900 tokens) and their slots freed.
    let t = Instant::now();
    loop {
        let h = health(&s);
        if h["active"] == 0 && h["queued"] == 0 {
            assert_eq!(h["cancelled"], 3, "{h}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "abandoned streams still running: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, again) = post(&s, "/v1/chat/completions", &other);
    assert_eq!((st, &again["choices"]), (200, &alone["choices"]));
}

#[test]
fn refuses_to_serve_a_corrupted_pack_or_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let p = pack(d.path());
    // Flip one byte in the largest container.
    let big = std::fs::read_dir(p.join("tensors"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&big).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x10;
    std::fs::write(&big, bytes).unwrap();
    let out = uc(&["serve", p.to_str().unwrap(), "--port", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VERIFY: FAIL"), "{err}");

    let m = model_with_tokenizer("llama");
    let out = uc(&["serve", m.path().to_str().unwrap(), "--port", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a pack"));
}

/// The Python interpreter with the `openai` package: `UC_TEST_PYTHON` (scripts/test.sh
/// sets it to the repository's .venv, which .ci/run creates), else `python3`.
fn python() -> String {
    std::env::var("UC_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn the_official_openai_python_client_gets_consistent_answers() {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .unwrap_or_else(|e| panic!("{py}: {e}"));
    assert!(
        probe.status.success(),
        "the openai Python package is missing for {py}: run `python3 -m venv .venv && \
         .venv/bin/pip install -r scripts/requirements-serve-test.txt` (as .ci/run does)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let d = tempfile::tempdir().unwrap();
    let s = serve(&pack(d.path()), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/serve_openai_check.py");
    let out = Command::new(&py)
        .arg(script)
        .args(["--base-url", &format!("{}/v1", s.url), "--model", &s.model])
        .args(["--prompt", "The quick brown fox", "--max-tokens", "12"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    // What the Python client saw is what curl sees for the same request.
    let (_, v) = post(
        &s,
        "/v1/chat/completions",
        &chat_body(&s, "The quick brown fox", json!({"max_tokens": 12})),
    );
    assert_eq!(seen["chat"]["text"], v["choices"][0]["message"]["content"]);
    assert_eq!(seen["chat"]["usage"], v["usage"]);
    assert_eq!(seen["chat"]["system_fingerprint"], s.fingerprint.as_str());
    assert_eq!(seen["unknown_model"]["code"], "model_not_found");
}
