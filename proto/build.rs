fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set feeds gRPC server reflection.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("consortium_v1_descriptor.bin"))
        // Frames and raw chunks as `Bytes`: a cached frame is sent without a copy.
        .bytes(".")
        .compile_protos(
            &["consortium/v1/center.proto", "consortium/v1/reading.proto"],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=consortium");
    Ok(())
}
