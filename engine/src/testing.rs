//! For tests that cannot check anything on this machine (no AMX, too few GPUs): they say so,
//! so that a run off AMX cannot pass silently.

use std::io::Write;

/// Records that `test` checked nothing here, and why: on stderr, and as one line of the file
/// named by `ONEHEAD_SKIPPED` when it is set (`scripts/test.sh` counts them in its summary).
pub fn skip(test: &str, why: &str) {
    let line = format!("{test}: {why}\n");
    eprint!("skipped {line}");
    if let Some(path) = std::env::var_os("ONEHEAD_SKIPPED")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        // One write of the whole line, so that concurrent tests do not interleave.
        let _ = file.write_all(line.as_bytes());
    }
}
