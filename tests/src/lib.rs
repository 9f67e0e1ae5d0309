//! Helpers for the end-to-end tests: start `onehead-worker` and `onehead-router` processes on
//! 127.0.0.1 (built by `cargo build --workspace --bins`, which `scripts/test.sh` runs first).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// A binary of the workspace, next to this test's own build, or in `ONEHEAD_BIN_DIR` when set
/// (to run these tests against another build, an older one say).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = match std::env::var_os("ONEHEAD_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => exe.parent().unwrap().parent().unwrap().to_owned(),
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running process that printed `listening on ADDR`; killed on drop.
pub struct Proc {
    pub child: tokio::process::Child,
    pub addr: String,
    /// `host:port` of `GET /metrics`, when the process was started with `--metrics-listen`.
    pub metrics_addr: Option<String>,
    /// `host:port` of the router's OpenAI-compatible API, when started with `--http-listen`.
    pub http_addr: Option<String>,
}

impl Proc {
    pub async fn start(binary_name: &str, args: &[&str]) -> Proc {
        Self::start_with_env(binary_name, args, &[]).await
    }

    /// Starts `binary_name` with `args` and extra environment variables.
    pub async fn start_with_env(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = tokio::process::Command::new(binary(binary_name));
        command.args(args).envs(env.iter().copied());
        Self::spawn(binary_name, command).await
    }

    /// Starts `binary_name` with `args`, allowed at most `nofile` open file descriptors.
    pub async fn start_with_nofile(binary_name: &str, args: &[&str], nofile: u32) -> Proc {
        let mut command = tokio::process::Command::new("sh");
        // `exec` keeps the PID: the process is the binary itself, under the lower limit.
        command.arg("-c").arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")).arg(binary(binary_name)).args(args);
        Self::spawn(binary_name, command).await
    }

    async fn spawn(binary_name: &str, mut command: tokio::process::Command) -> Proc {
        let mut child = command
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut metrics_addr = None;
        let mut http_addr = None;
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("metrics on http://") {
                    metrics_addr = url.strip_suffix("/metrics").map(str::to_owned);
                }
                if let Some(addr) = line.strip_prefix("http on http://") {
                    http_addr = Some(addr.to_owned());
                }
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.to_owned();
                }
            }
            panic!("{binary_name} exited before listening")
        })
        .await
        .expect("process start");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Proc { child, addr, metrics_addr, http_addr }
    }

    /// The body of `GET /metrics`.
    pub async fn scrape_text(&self) -> String {
        use tokio::io::AsyncWriteExt;
        let addr = self.metrics_addr.as_ref().expect("started with --metrics-listen");
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut socket, &mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response.split_once("\r\n\r\n").unwrap().1.to_owned()
    }

    /// `GET /metrics`: each sample line's name-with-labels and value.
    pub async fn scrape(&self) -> std::collections::HashMap<String, f64> {
        self.scrape_text()
            .await
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').unwrap();
                (name.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.unwrap()
    }

    /// Waits until `grpc.health.v1` says SERVING.
    pub async fn wait_serving(&self) {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            if let Ok(r) = health.check(request).await
                && r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
            assert!(Instant::now() < deadline, "{} never became SERVING", self.addr);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn kill(&mut self) {
        self.child.start_kill().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.unwrap().success(), "kill -{signal}");
    }

    /// CPU seconds (user + system) the process has used so far, from /proc.
    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesized command name; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }
}

/// A worker serving `builtin:tiny` with one intra-op thread.
pub async fn worker(extra: &[&str]) -> Proc {
    worker_with_model("builtin:tiny", extra).await
}

/// A worker serving `model` with one intra-op thread, ready to serve.
pub async fn worker_with_model(model: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["serve", "--model", model, "--threads", "1"];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let w = Proc::start("onehead-worker", &args).await;
    w.wait_serving().await;
    w
}

/// A router in front of `workers`, ready to serve.
pub async fn router(workers: &[&Proc], extra: &[&str]) -> Proc {
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    let mut args = vec!["--listen", "127.0.0.1:0"];
    if !extra.contains(&"--health-interval-ms") {
        args.extend(["--health-interval-ms", "200"]);
    }
    for url in &urls {
        args.extend(["--worker", url]);
    }
    args.extend_from_slice(extra);
    let r = Proc::start("onehead-router", &args).await;
    r.wait_serving().await;
    r
}

pub async fn worker_load(worker: &Proc) -> wpb::Load {
    let mut client = wpb::worker_client::WorkerClient::new(worker.channel().await);
    client.get_load(wpb::GetLoadRequest {}).await.unwrap().into_inner()
}

/// A greedy request for `text`.
pub fn text_request(text: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text.into())),
        parameters: Some(pb::Parameters {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

/// A whole stream: token ids, pieces, and the final message (or the status it ended with).
pub struct Streamed {
    pub ids: Vec<u32>,
    pub pieces: Vec<String>,
    pub done: Result<pb::GenerateDone, tonic::Status>,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.pieces.concat() + self.done.as_ref().map_or("", |d| d.text.as_str())
    }
}

pub async fn stream(
    client: &mut pb::text_generation_client::TextGenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Streamed {
    let mut out = Streamed { ids: vec![], pieces: vec![], done: Err(tonic::Status::unknown("no Done")) };
    let mut events = match client.generate_stream(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            out.done = Err(status);
            return out;
        }
    };
    loop {
        match events.message().await {
            Ok(Some(pb::GenerateStreamResponse { event: Some(pb::generate_stream_response::Event::Token(t)) })) => {
                out.ids.push(t.id);
                out.pieces.push(t.text);
            }
            Ok(Some(pb::GenerateStreamResponse { event: Some(pb::generate_stream_response::Event::Done(d)) })) => {
                out.done = Ok(d);
                assert!(matches!(events.message().await, Ok(None)), "Done is the last message");
                return out;
            }
            Ok(_) => return out,
            Err(status) => {
                out.done = Err(status);
                return out;
            }
        }
    }
}

/// An HTTP/1.1 answer, its body de-chunked.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` of each server-sent event, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                assert!(!data.is_empty(), "an event without data: {e:?}");
                data.join("\n")
            })
            .collect()
    }
}

/// Sends one request (`Connection: close`) and returns the socket, to read the answer from.
pub async fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if !body.is_empty() {
        head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    socket
}

/// One request to a router's `--http-listen` API, and its whole answer.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> HttpResponse {
    let mut socket = http_send(addr, method, path, headers, body).await;
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head: {raw:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    HttpResponse { status, headers, body }
}

/// The body of a `Transfer-Encoding: chunked` message.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// A self-signed certificate for `localhost` and its key, made by `openssl` in a temporary
/// folder named after `name` and this process: (cert.pem, key.pem).
pub fn self_signed_certificate(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost", "-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test certificate");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    (cert, key)
}
