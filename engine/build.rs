//! Gives this crate's test binaries an rpath to LibTorch, so that it starts without
//! `LD_LIBRARY_PATH`, and one to the wheel's NCCL folder, keeps libtorch_cuda linked where the
//! wheel has it, and compiles `csrc/onednn.cpp` (LibTorch operators tch does not bind) against
//! LibTorch's headers and `csrc/amx.cpp` (the decode-sized products on AMX).
//! torch-sys reports LibTorch's library folder through its `links = "tch"` key.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/onednn.cpp");
    println!("cargo:rerun-if-changed=csrc/amx.cpp");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports LibTorch's lib folder");
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or_else(|_| PathBuf::from(lib_dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The linker drops libtorch_cuda (nothing references it by symbol), and without it
    // loaded LibTorch reports no CUDA. Keep it, so that one build runs on CPU and GPU.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    nccl_rpath(&lib_dir);
    // The same C++ ABI as torch-sys builds its own wrapper with (the PyPI wheels use the new one).
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(lib_dir.with_file_name("include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/onednn.cpp")
        .file("csrc/amx.cpp")
        .compile("onehead_csrc");
}

/// cudarc opens NCCL by names such as `libnccl.so`, never the wheel's `libnccl.so.2`, so
/// `scripts/setup-libtorch.sh` links `libnccl.so` to it in the wheel's NCCL folder, and this
/// rpath reaches it (the binaries get DT_RUNPATH, which glibc's dlopen searches for calls from
/// the executable itself, where cudarc's loader is linked). `ONEHEAD_NCCL_DIR` tells the
/// engine's messages and tests where that is. The same as in worker/build.rs.
fn nccl_rpath(lib_dir: &std::path::Path) {
    let Some(site_packages) = lib_dir.parent().and_then(|torch| torch.parent()) else { return };
    let nccl_dir = site_packages.join("nvidia/nccl/lib");
    if !nccl_dir.join("libnccl.so.2").exists() {
        return;
    }
    println!("cargo:rerun-if-changed={}", nccl_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl_dir.display());
    println!("cargo:rustc-env=ONEHEAD_NCCL_DIR={}", nccl_dir.display());
    if !nccl_dir.join("libnccl.so").exists() {
        println!(
            "cargo:warning={} has no libnccl.so, so NCCL will not be found: run scripts/setup-libtorch.sh",
            nccl_dir.display()
        );
    }
}
