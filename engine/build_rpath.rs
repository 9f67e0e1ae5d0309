//! What every build script that links LibTorch does, shared by engine/build.rs and
//! worker/build.rs (which onehead-benches runs too) through `#[path]`: torch-sys reports
//! LibTorch's library folder through its `links = "tch"` key.

use std::path::{Path, PathBuf};

/// Gives the package's binaries an rpath to LibTorch, so that they start without
/// `LD_LIBRARY_PATH`, keeps libtorch_cuda linked where the wheel has it, and adds an rpath to
/// the wheel's NCCL folder. Returns LibTorch's library folder and the NCCL folder, if any.
pub fn link_libtorch() -> (PathBuf, Option<PathBuf>) {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports LibTorch's lib folder");
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or_else(|_| PathBuf::from(lib_dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The linker drops libtorch_cuda (nothing references it by symbol), and without it
    // loaded LibTorch reports no CUDA. Keep it, so that one build runs on CPU and GPU.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let nccl_dir = nccl_rpath(&lib_dir);
    (lib_dir, nccl_dir)
}

/// cudarc opens NCCL by names such as `libnccl.so`, never the wheel's `libnccl.so.2`, so
/// `scripts/setup-libtorch.sh` (and the worker's Dockerfile) link `libnccl.so` to it in the
/// wheel's NCCL folder, and this rpath reaches it (the binaries get DT_RUNPATH, which glibc's
/// dlopen searches for calls from the executable itself, where cudarc's loader is linked).
fn nccl_rpath(lib_dir: &Path) -> Option<PathBuf> {
    let site_packages = lib_dir.parent()?.parent()?;
    let nccl_dir = site_packages.join("nvidia/nccl/lib");
    if !nccl_dir.join("libnccl.so.2").exists() {
        return None;
    }
    println!("cargo:rerun-if-changed={}", nccl_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl_dir.display());
    if !nccl_dir.join("libnccl.so").exists() {
        println!(
            "cargo:warning={} has no libnccl.so, so NCCL will not be found: run scripts/setup-libtorch.sh",
            nccl_dir.display()
        );
    }
    Some(nccl_dir)
}
