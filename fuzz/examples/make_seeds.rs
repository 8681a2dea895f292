//! Writes seed inputs for the fuzz targets into corpus/<target>/ from a small real pack.
use uc_codec::pack::{write_dense_tensor, write_quant_tensor};
use uc_codec::{encode_rtn, CodecSpec, Overlay};
use uc_format::{block_container, ContainerBuilder, DenseDtype, PackWriter, Role, SourceInfo};

fn main() {
    let tmp = std::env::temp_dir().join(format!("uc-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut w = PackWriter::create(&tmp, SourceInfo::default()).unwrap();
    let mut c = ContainerBuilder::new(&block_container(0)).unwrap();
    let wt: Vec<f32> = (0..4 * 40)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
        .collect();
    let q = encode_rtn(&wt, 4, 40, &CodecSpec::parse("q3g32").unwrap(), None).unwrap();
    write_quant_tensor(&mut c, "a", Role::Body, &q, None).unwrap();
    let spec = CodecSpec::parse("q3g32r1").unwrap();
    let ov = Overlay {
        rank: 1,
        a: vec![0x3f80; 4],
        b: vec![0x3c00; 40],
    };
    write_quant_tensor(
        &mut c,
        "b",
        Role::Body,
        &uc_codec::QuantTensor {
            spec,
            overlay: Some(ov),
            ..q
        },
        None,
    )
    .unwrap();
    write_dense_tensor(
        &mut c,
        "n",
        Role::Norm,
        &[1.0, 2.0],
        &[2],
        DenseDtype::Bf16,
        None,
    )
    .unwrap();
    w.write_container(c).unwrap();
    w.finish().unwrap();
    let manifest = std::fs::read(tmp.join("manifest.json")).unwrap();
    let container = std::fs::read(tmp.join("tensors/block_0000.safetensors")).unwrap();
    let mut pack = (manifest.len() as u32).to_le_bytes().to_vec();
    pack.extend(&manifest);
    pack.extend(&container);
    for (target, bytes) in [
        ("manifest_parse", &manifest),
        ("container_parse", &container),
        ("pack_verify", &pack),
    ] {
        let d = std::path::Path::new("corpus").join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("seed"), bytes).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
