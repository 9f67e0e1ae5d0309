//! Gives this crate's test binaries an rpath to LibTorch, so that it starts without
//! `LD_LIBRARY_PATH`, keeps libtorch_cuda linked where the wheel has it, and compiles
//! `csrc/onednn.cpp` (LibTorch operators tch does not bind) against LibTorch's headers and
//! `csrc/amx.cpp` (the decode-sized products on AMX).
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
