//! The router's OpenAI-compatible API driven by the official `openai` Python package
//! (`tests/openai_sdk.py`, pinned in `tests/openai-requirements.txt`, which `scripts/test.sh`
//! installs into the project's `.venv`): completions and chat, whole and streamed, and errors.

use std::path::Path;

use onehead_tests::{router, worker};

/// The project's Python, if it has the `openai` package; else the test is recorded as skipped.
fn python_with_openai(repo: &Path) -> Option<std::path::PathBuf> {
    let python = repo.join(".venv/bin/python");
    let ok =
        std::process::Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// Records that `test` checked nothing (the line `scripts/test.sh` counts as skipped).
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("{test}: {why}\n");
    eprint!("skipped {line}");
    if let Some(path) = std::env::var_os("ONEHEAD_SKIPPED")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_drives_completions_and_chat() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let Some(python) = python_with_openai(repo) else {
        skip(
            "openai_sdk::the_openai_python_sdk_drives_completions_and_chat",
            "no `openai` in .venv: `.venv/bin/pip install -r tests/openai-requirements.txt` (scripts/test.sh does)",
        );
        return;
    };
    let w = worker(&[]).await;
    let keys = std::env::temp_dir().join(format!("onehead-sdk-keys-{}", std::process::id()));
    std::fs::write(&keys, "sdk-key\n").unwrap();
    let r = router(&[&w], &["--http-listen", "127.0.0.1:0", "--api-key-file", keys.to_str().unwrap()]).await;
    let base_url = format!("http://{}/v1", r.http_addr.as_ref().unwrap());
    let output = tokio::process::Command::new(python)
        .arg(repo.join("tests/openai_sdk.py"))
        .args([&base_url, "sdk-key"])
        .output()
        .await
        .unwrap();
    std::fs::remove_file(keys).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "tests/openai_sdk.py failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
