//! A prompt prefilled in pieces (`Decoder::prefill`) gives the bits of one prefill,
//! where `Decoder::prefix_reuse_is_exact` says so: the guarantee `uc serve`'s prompt
//! cache rests on (a request that reuses another's cached prefix is answered with the bits of
//! a cold request).
//!
//! The model is a synthetic Mistral-like checkpoint (uc-synth's `tiny_wide`: every
//! linear's input a multiple of 64, so each takes the integer GEMM), packed without
//! overlays. Its sliding window of 64 positions puts later queries'
//! first visible key past 0.

mod common;

use common::{write_pack, write_pack_from};
use std::path::Path;
use std::sync::Arc;
use uc_runtime::weights::PackLoader;
use uc_runtime::{Decoder, DecoderOptions, Logits, Verify, WeightLoader};

fn synth_pack(dir: &Path) -> Arc<dyn WeightLoader> {
    let shape = uc_synth::Shape::tiny_wide();
    let ck = dir.join("ck");
    uc_synth::write_checkpoint(&ck, &shape, 11, &mut |_| {}).unwrap();
    let pack = dir.join("pack");
    write_pack_from(&ck, &pack, false);
    Arc::new(PackLoader::open(&pack, Verify::Full).unwrap())
}

fn decoder(p: &Arc<dyn WeightLoader>) -> Decoder {
    let mut d = Decoder::new(
        p.clone(),
        DecoderOptions {
            capacity: 160,
            stream_layers: false,
        },
    )
    .unwrap();
    d.set_fast_prefill(true).unwrap();
    d
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_prompt_prefilled_in_pieces_gives_the_bits_of_one_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let p = synth_pack(tmp.path());
    let ids: Vec<u32> = (0..120u32).map(|i| (i * 37 + 11) % 128).collect();
    let mut cold = decoder(&p);
    if !cold.prefix_reuse_is_exact() {
        // Only where the CPU lacks the integer GEMM (AVX-512 VNNI + VBMI).
        let isa = uc_runtime::kernels::Isa::detect();
        assert!(
            !uc_runtime::kernels::qgemm::available(isa),
            "every linear of the synthetic pack should take the integer GEMM"
        );
        eprintln!("skipped: no integer GEMM on this CPU, so prefix reuse is refused");
        return;
    }
    // Generation's f16 KV cache is part of what is tested.
    assert_eq!(cold.kv_dtype(), uc_runtime::kv::KvDtype::F16);
    let want = bits(&cold.prefill(&ids).unwrap());
    assert_eq!(cold.tokens(), &ids[..]);
    // A long prompt goes through forward() as through prefill().
    assert_eq!(
        bits(&decoder(&p).forward(&ids, Logits::Last).unwrap()),
        want
    );
    // Two prefills of every size class: 1..=4 tokens (the few-token kernel with the
    // GEMM's bits), the GEMM above; attention blocks of 16 tokens; past the sliding
    // window.
    for split in [
        1, 2, 3, 4, 5, 15, 16, 17, 40, 64, 65, 100, 115, 116, 117, 118, 119,
    ] {
        let mut d = decoder(&p);
        d.prefill(&ids[..split]).unwrap();
        let got = bits(&d.prefill(&ids[split..]).unwrap());
        assert_eq!(got, want, "prefix of {split}, then the rest");
    }
    // Three pieces, two of them short.
    let mut d = decoder(&p);
    d.prefill(&ids[..2]).unwrap();
    d.prefill(&ids[2..90]).unwrap();
    d.prefill(&ids[90..93]).unwrap();
    let got = bits(&d.prefill(&ids[93..]).unwrap());
    assert_eq!(got, want, "pieces of 2, 88, 3 and 27");
    // keep_prefix: a cache holding another continuation of the first 80 tokens.
    let mut d = decoder(&p);
    let mut seen = ids[..80].to_vec();
    seen.extend([3, 5, 9, 2, 2, 2]);
    d.prefill(&seen).unwrap();
    assert_eq!(d.keep_prefix(&ids), 80);
    assert_eq!((d.position(), d.tokens()), (80, &ids[..80]));
    let got = bits(&d.prefill(&ids[80..]).unwrap());
    assert_eq!(got, want, "kept prefix of 80");
    // The whole prompt cached: the last token is run again for its logits.
    assert_eq!(d.keep_prefix(&ids), 119);
    let got = bits(&d.prefill(&ids[119..]).unwrap());
    assert_eq!(got, want, "kept all but the last");
    // Decode steps (forward of one token) and batched decode steps are not kept: their
    // kernels round activations more finely than the prefill GEMM.
    let base = decoder(&p);
    let fork = || base.fork(160).unwrap();
    let (mut a, mut a2, mut b) = (fork(), fork(), fork());
    a.prefill(&ids[..50]).unwrap();
    for &t in &ids[50..54] {
        a.forward(&[t], Logits::Last).unwrap();
    }
    a2.prefill(&ids[..60]).unwrap();
    b.prefill(&ids[..30]).unwrap();
    let mut slots = [&mut a2, &mut b];
    Decoder::forward_batch(&mut slots, &[ids[60], ids[30]]).unwrap();
    for (d, cached) in [(&mut a, 50), (&mut a2, 60), (&mut b, 30)] {
        assert_eq!(d.keep_prefix(&ids), cached);
        let got = bits(&d.prefill(&ids[cached..]).unwrap());
        assert_eq!(got, want, "after decode steps, {cached} kept");
    }
    // A one-token prompt keeps nothing.
    assert_eq!(d.keep_prefix(&ids[..1]), 0);
}

/// Where the f32 GEMMs run (the fixtures' 96-wide down_proj, overlays, the exact
/// prefill), prefix reuse is refused and `keep_prefix` starts over.
#[test]
fn prefix_reuse_is_refused_where_a_call_rounds_by_its_row_count() {
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    write_pack("llama", &pack);
    let p: Arc<dyn WeightLoader> = Arc::new(PackLoader::open(&pack, Verify::Full).unwrap());
    let mut d = decoder(&p);
    assert!(!d.prefix_reuse_is_exact());
    let ids: Vec<u32> = (0..20u32).collect();
    d.forward(&ids, Logits::Last).unwrap();
    assert_eq!(d.keep_prefix(&ids), 0);
    assert_eq!(d.position(), 0);
    assert!(d.tokens().is_empty());
    let tmp2 = tempfile::tempdir().unwrap();
    let synth = synth_pack(tmp2.path());
    let mut exact = decoder(&synth);
    exact.set_fast_prefill(false).unwrap();
    assert!(!exact.prefix_reuse_is_exact(), "the exact prefill's GEMMs");
}
