//! Compiles `proto/codafs.proto` with the protoc shipped by `protoc-bin-vendored`, so a fresh
//! machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; build scripts are single-threaded.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        // Blob chunks and hashes as `bytes::Bytes`: chunks are sliced out of larger buffers
        // without copying.
        .bytes(".")
        .compile_protos(&["proto/codafs.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/codafs.proto");
    Ok(())
}
