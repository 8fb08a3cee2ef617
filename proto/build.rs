fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["consortium/v1/center.proto"], &["."])?;
    println!("cargo:rerun-if-changed=consortium");
    Ok(())
}
