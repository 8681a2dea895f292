//! Writes a synthetic Llama-shaped pack of Gaussian weights, for benchmarks:
//! `synth_pack OUT [BLOCKS] [HIDDEN] [CODEC] [dense|quant]` (defaults: 30 blocks,
//! hidden 576 -- SmolLM2-135M's shapes -- codec q5g128, embedding stored dense f32;
//! `quant` quantizes the embedding too, the worst case for verification speed).

use uc_codec::pack::{write_dense_tensor, write_quant_tensor};
use uc_codec::{encode_rtn, CodecSpec};
use uc_format::{
    block_container, ContainerBuilder, DenseDtype, PackWriter, Role, SourceInfo, GLOBALS_CONTAINER,
};

fn gaussian(seed: u64, n: usize, sd: f32) -> Vec<f32> {
    let mut rng = uc_format::SplitMix64(seed);
    (0..n).map(|_| rng.normal() * sd).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .ok_or("usage: synth_pack OUT [BLOCKS] [HIDDEN] [CODEC] [dense|quant]")?;
    let blocks: usize = args.get(2).map_or(Ok(30), |s| s.parse())?;
    let hidden: usize = args.get(3).map_or(Ok(576), |s| s.parse())?;
    let spec = CodecSpec::parse(args.get(4).map_or("q5g128", |s| s.as_str()))?;
    let (inter, vocab) = (hidden * 8 / 3, 49152usize);
    let mut w = PackWriter::create(
        out,
        SourceInfo {
            architecture: "llama".into(),
            ..Default::default()
        },
    )?;
    w.write_file(
        "config.json",
        format!("{{\"hidden_size\": {hidden}, \"num_hidden_layers\": {blocks}}}\n").as_bytes(),
    )?;
    let mut g = ContainerBuilder::new(GLOBALS_CONTAINER)?;
    let emb = gaussian(1, vocab * hidden, 0.02);
    if args.get(5).is_some_and(|s| s == "quant") {
        write_quant_tensor(
            &mut g,
            "model.embed_tokens.weight",
            Role::Embed,
            &encode_rtn(&emb, vocab, hidden, &spec, None)?,
            None,
        )?;
    } else {
        write_dense_tensor(
            &mut g,
            "model.embed_tokens.weight",
            Role::Embed,
            &emb,
            &[vocab, hidden],
            DenseDtype::F32,
            None,
        )?;
    }
    write_dense_tensor(
        &mut g,
        "model.norm.weight",
        Role::Norm,
        &vec![1.0; hidden],
        &[hidden],
        DenseDtype::F32,
        None,
    )?;
    w.write_container(g)?;
    // (name, rows, cols)
    let linears = [
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", hidden / 3, hidden),
        ("self_attn.v_proj", hidden / 3, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    ];
    for b in 0..blocks {
        let mut c = ContainerBuilder::new(&block_container(b))?;
        for (k, (name, rows, cols)) in linears.iter().enumerate() {
            let wt = gaussian((b * 16 + k) as u64 + 100, rows * cols, 0.02);
            let qt = encode_rtn(&wt, *rows, *cols, &spec, None)?;
            write_quant_tensor(
                &mut c,
                &format!("model.layers.{b}.{name}.weight"),
                Role::Body,
                &qt,
                None,
            )?;
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            write_dense_tensor(
                &mut c,
                &format!("model.layers.{b}.{n}.weight"),
                Role::Norm,
                &vec![1.0; hidden],
                &[hidden],
                DenseDtype::F32,
                None,
            )?;
        }
        w.write_container(c)?;
        eprint!("\rblock {}/{blocks}", b + 1);
    }
    let m = w.finish()?;
    eprintln!(
        "\nwrote {out}: bpw_body {:.3}, bpw_model {:.3}",
        m.bpw_body, m.bpw_model
    );
    Ok(())
}
