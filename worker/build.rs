//! Gives the binaries of the crates that run this script (onehead-worker, onehead-benches) an
//! rpath to LibTorch, so that they start without `LD_LIBRARY_PATH`, and keeps libtorch_cuda
//! linked where the wheel has it. torch-sys reports LibTorch's library folder through its
//! `links = "tch"` key.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports LibTorch's lib folder");
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or_else(|_| PathBuf::from(lib_dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The linker drops libtorch_cuda (nothing references it by symbol), and without it
    // loaded LibTorch reports no CUDA. Keep it, so that one build runs on CPU and GPU.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
