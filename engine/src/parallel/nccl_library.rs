//! How NCCL is found and spoken to: the library cudarc opens (and its version), NCCL's element
//! types, the communicator configuration, and what NCCL's and CUDA's status codes mean for a
//! collective in flight. All but the library look-up are pure, and tested on CPU.
//!
//! cudarc opens NCCL by name at run time (`libnccl.so`, `libnccl.so.13`, ...) and panics when
//! none opens; the torch wheel ships `libnccl.so.2`, which it does not try.
//! `scripts/setup-libtorch.sh` (and the worker's Dockerfile) link `libnccl.so` to it, and the
//! build scripts give the binaries an rpath to that folder.

use std::ffi::c_int;
use std::ptr;

use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;
use cudarc::runtime::{result as cuda, sys as cuda_sys};
use tch::Kind;

use crate::error::{Error, Result};
use crate::parallel::watchdog::Progress;

/// Nonblocking communicators need NCCL 2.14 (`ncclCommInitRankConfig`).
pub const OLDEST_NCCL: (u32, u32, u32) = (2, 14, 0);

/// NCCL's version as (major, minor, patch), from the library cudarc opens.
pub fn version() -> Result<(u32, u32, u32)> {
    // SAFETY: opening NCCL runs its initialisers, which have no preconditions.
    if !unsafe { sys::is_culib_present() } {
        return Err(missing("NCCL", "nccl", nccl_folders()));
    }
    Ok(decode_version(result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))?))
}

/// NCCL's version code: `major*10000 + minor*100 + patch` since 2.9, `major*1000 + ...` before.
fn decode_version(code: c_int) -> (u32, u32, u32) {
    let code = code.max(0) as u32;
    if code >= 10_000 {
        (code / 10_000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    }
}

/// Fails by name unless cudarc can open NCCL (recent enough) and the CUDA runtime: its own
/// loaders panic instead.
pub(super) fn check_libraries() -> Result<()> {
    let found = version()?;
    if found < OLDEST_NCCL {
        let (major, minor, patch) = found;
        let message = format!("NCCL {major}.{minor}.{patch} found; nonblocking communicators need 2.14 or later");
        return Err(Error::Cuda { call: "ncclGetVersion", message });
    }
    // SAFETY: as for NCCL above.
    if !unsafe { cuda_sys::is_culib_present() } {
        let looked_in =
            "the libraries already loaded (libtorch_cuda links the CUDA runtime), then the system's library path";
        return Err(missing("the CUDA runtime", "cudart", looked_in.into()));
    }
    Ok(())
}

fn missing(library: &'static str, name: &str, looked_in: String) -> Error {
    Error::LibraryMissing { library, tried: cudarc::get_lib_name_candidates(name).join(", "), looked_in }
}

/// Where this build's binaries look for NCCL (`engine/build.rs` and `worker/build.rs` set the
/// rpath), in words.
fn nccl_folders() -> String {
    match option_env!("ONEHEAD_NCCL_DIR") {
        Some(dir) => format!(
            "{dir} (the binary's rpath; scripts/setup-libtorch.sh links libnccl.so there to the wheel's \
             libnccl.so.2), then the system's library path"
        ),
        None => "the system's library path (the LibTorch this was built against has no NCCL beside it)".into(),
    }
}

/// NCCL's element type for `kind`: every kind that has one, so that no collective is refused
/// for a dtype NCCL carries.
pub(super) fn data_type(kind: Kind) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Ok(match kind {
        Kind::Uint8 => T::ncclUint8,
        Kind::Int8 => T::ncclInt8,
        Kind::Int => T::ncclInt32,
        Kind::Int64 => T::ncclInt64,
        Kind::Half => T::ncclFloat16,
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Float8e4m3fn => T::ncclFloat8e4m3,
        Kind::Float8e5m2 => T::ncclFloat8e5m2,
        // Bool would add as bytes, not as logic; the rest have no NCCL type.
        other => return Err(Error::invalid("dtype", format!("no NCCL type for {other:?}"))),
    })
}

pub(super) fn nccl_error(call: &'static str, e: NcclError) -> Error {
    Error::Cuda { call, message: format!("{:?}", e.0) }
}

pub(super) fn cuda_error(call: &'static str, e: cuda::RuntimeError) -> Error {
    Error::Cuda { call, message: format!("{:?}", e.0) }
}

/// Where a nonblocking NCCL call, or a communicator's asynchronous state, stands.
pub(super) fn nccl_progress(status: Result<NcclStatus, NcclError>) -> Progress {
    match status {
        Ok(NcclStatus::Success) => Progress::Done,
        Ok(NcclStatus::InProgress) => Progress::Running,
        Ok(NcclStatus::NumResults) => Progress::Failed("ncclNumResults".into()),
        Err(e) => Progress::Failed(format!("{:?}", e.0)),
    }
}

/// Where the work before an event stands, from `cudaEventQuery`.
pub(super) fn event_progress(status: cuda_sys::cudaError_t) -> Progress {
    match status {
        cuda_sys::cudaError_t::cudaSuccess => Progress::Done,
        cuda_sys::cudaError_t::cudaErrorNotReady => Progress::Running,
        other => Progress::Failed(format!("{other:?}")),
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field unset
/// (`NCCL_CONFIG_UNDEF_INT`, null), so NCCL chooses.
pub(super) fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // The layout cudarc declares (`ncclConfig_v22800`); NCCL resets what a version lacks.
        version: 22_800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_and_cuda_states_map_to_progress() {
        use cuda_sys::cudaError_t as C;
        use sys::ncclResult_t as R;
        assert_eq!(nccl_progress(Ok(NcclStatus::Success)), Progress::Done);
        assert_eq!(nccl_progress(Ok(NcclStatus::InProgress)), Progress::Running);
        assert_eq!(nccl_progress(Err(NcclError(R::ncclRemoteError))), Progress::Failed("ncclRemoteError".into()));
        assert_eq!(event_progress(C::cudaSuccess), Progress::Done);
        assert_eq!(event_progress(C::cudaErrorNotReady), Progress::Running);
        assert_eq!(event_progress(C::cudaErrorIllegalAddress), Progress::Failed("cudaErrorIllegalAddress".into()));
        // ncclResult_t's own mapping: InProgress is not an error.
        assert_eq!(nccl_progress(R::ncclInProgress.result()), Progress::Running);
        let config = nonblocking_config();
        assert_eq!(
            (config.magic, config.blocking, config.size),
            (0xcafe_beef, 0, std::mem::size_of::<sys::ncclConfig_t>())
        );
    }

    #[test]
    fn versions_decode_in_both_of_nccls_encodings() {
        assert_eq!(decode_version(22_809), (2, 28, 9));
        assert_eq!(decode_version(2_708), (2, 7, 8));
        assert!(decode_version(21_400) >= OLDEST_NCCL && decode_version(21_304) < OLDEST_NCCL);
    }

    #[test]
    fn a_missing_library_is_named_with_the_names_tried() {
        let e = missing("NCCL", "nccl", nccl_folders()).to_string();
        assert!(e.starts_with("NCCL not found: tried libnccl.so, "), "{e}");
        assert!(e.contains("libnccl.so.12") && e.contains("looked in"), "{e}");
    }

    /// Runs on CPU: NCCL comes with the CUDA torch wheel, and loading it needs no GPU.
    #[test]
    fn nccl_is_found_and_answers_its_version() {
        let Some(dir) = option_env!("ONEHEAD_NCCL_DIR") else {
            let why = "the LibTorch this was built against has no NCCL beside it (a CPU-only build)";
            crate::testing::skip("parallel::nccl_library::nccl_is_found_and_answers_its_version", why);
            return;
        };
        let (major, minor, patch) = version().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("NCCL {major}.{minor}.{patch}, found through {dir}");
        assert!((major, minor, patch) >= OLDEST_NCCL, "NCCL {major}.{minor}.{patch}");
        // cudarc's copy is the one LibTorch loaded (libtorch_cuda links libnccl.so.2), not a
        // second one: two would not share state.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let code = maps.lines().filter(|l| l.contains("libnccl") && l.contains(" r-xp ")).count();
        assert_eq!(code, 1, "NCCL's code is mapped {code} times:\n{maps}");
    }
}
