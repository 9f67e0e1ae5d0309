//! Gives the binaries of the crates that run this script (onehead-worker, onehead-benches) an
//! rpath to LibTorch, so that they start without `LD_LIBRARY_PATH`, keeps libtorch_cuda linked
//! where the wheel has it, and adds an rpath to the wheel's NCCL folder. torch-sys reports
//! LibTorch's library folder through its `links = "tch"` key.

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
    nccl_rpath(&lib_dir);
}

/// cudarc opens NCCL by names such as `libnccl.so`, never the wheel's `libnccl.so.2`, so
/// `scripts/setup-libtorch.sh` (and the worker's Dockerfile) link `libnccl.so` to it in the
/// wheel's NCCL folder, and this rpath reaches it. The same as in engine/build.rs.
fn nccl_rpath(lib_dir: &std::path::Path) {
    let Some(site_packages) = lib_dir.parent().and_then(|torch| torch.parent()) else { return };
    let nccl_dir = site_packages.join("nvidia/nccl/lib");
    if !nccl_dir.join("libnccl.so.2").exists() {
        return;
    }
    println!("cargo:rerun-if-changed={}", nccl_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl_dir.display());
    if !nccl_dir.join("libnccl.so").exists() {
        println!(
            "cargo:warning={} has no libnccl.so, so NCCL will not be found: run scripts/setup-libtorch.sh",
            nccl_dir.display()
        );
    }
}
