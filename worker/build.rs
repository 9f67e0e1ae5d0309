//! The rpaths to LibTorch and NCCL for the binaries of the crates that run this script
//! (onehead-worker, onehead-benches): see engine/build_rpath.rs.

#[path = "../engine/build_rpath.rs"]
mod build_rpath;

fn main() {
    build_rpath::link_libtorch();
}
