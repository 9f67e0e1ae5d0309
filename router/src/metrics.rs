//! The router's metrics: requests by outcome, and the GenAI server timings and token usage,
//! each series labelled with the route the requests came in by (`onehead_route`: a gRPC method
//! or an HTTP path) and its `gen_ai_operation_name`. Every HTTP request is counted once: by the
//! shared path once it reaches it, and otherwise by the HTTP API (`http_request`).

use onehead_telemetry::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};
use tonic::Code;

use crate::service::Route;

/// Every route a generation comes in by; each has its own series.
pub const ROUTES: [Route; 4] = [
    Route { path: "/onehead.v1.TextGeneration/Generate", operation: "text_completion" },
    Route { path: "/onehead.v1.TextGeneration/GenerateStream", operation: "text_completion" },
    Route { path: "/v1/completions", operation: "text_completion" },
    Route { path: "/v1/chat/completions", operation: "chat" },
];
/// The HTTP API's one path that is no generation: only its requests are counted.
pub const MODELS_PATH: &str = "/v1/models";
/// The `onehead_route` of an HTTP request to a path the API does not serve: one label for all,
/// so that clients cannot add series.
pub const UNMATCHED: &str = "unmatched";
/// Token-count buckets recommended for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// Buckets for time per output token.
const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
/// The codes counted; any other is counted as `Internal`. `NotFound` and `Unimplemented` come
/// only from the HTTP API: a model or path it lacks, a method a path does not take.
const CODES: [Code; 10] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::ResourceExhausted,
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::Internal,
    Code::Cancelled,
    Code::Unauthenticated,
    Code::NotFound,
    Code::Unimplemented,
];

pub struct RouterMetrics {
    routes: Vec<(&'static str, RouteMetrics)>,
    /// The requests of `MODELS_PATH` and of `UNMATCHED` paths.
    models: Requests,
    unmatched: Requests,
    pub in_flight: Gauge,
    pub healthy_workers: Gauge,
}

/// One route's series.
struct RouteMetrics {
    requests: Requests,
    duration: Histogram,
    ttft: Histogram,
    tpot: Histogram,
    itl: Histogram,
    input_tokens: Histogram,
    output_tokens: Histogram,
}

fn code_name(code: Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut s, c| {
        if c.is_uppercase() && !s.is_empty() {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
        s
    })
}

impl RouterMetrics {
    pub fn new(registry: &Registry) -> Self {
        RouterMetrics {
            routes: ROUTES.iter().map(|&route| (route.path, RouteMetrics::new(registry, route))).collect(),
            models: Requests::new(registry, MODELS_PATH),
            unmatched: Requests::new(registry, UNMATCHED),
            in_flight: registry.gauge("onehead_router_requests_in_flight", "Requests admitted and not finished.", &[]),
            healthy_workers: registry.gauge("onehead_router_healthy_workers", "Workers passing health checks.", &[]),
        }
    }

    /// The series of `route` (a route not in `ROUTES` is counted as the first).
    fn route(&self, route: Route) -> &RouteMetrics {
        self.routes.iter().find(|(path, _)| *path == route.path).map_or(&self.routes[0].1, |(_, m)| m)
    }

    /// A request ended with `code`.
    pub fn request(&self, route: Route, code: Code) {
        self.route(route).requests.count(code);
    }

    /// An HTTP request that the shared path did not count (it never reached it), under its
    /// path: a generation route's, `MODELS_PATH`, or else `UNMATCHED`.
    pub fn http_request(&self, path: &str, code: Code) {
        // Only the HTTP API's own routes: a gRPC method's path sent to the HTTP port is unmatched.
        let requests = match self.routes.iter().find(|(p, _)| *p == path && p.starts_with("/v1/")) {
            Some((_, route)) => &route.requests,
            None if path == MODELS_PATH => &self.models,
            None => &self.unmatched,
        };
        requests.count(code);
    }

    /// The gap between two consecutive tokens of one request.
    pub fn inter_token(&self, route: Route, secs: f64) {
        self.route(route).itl.observe(secs);
    }

    /// A completed generation.
    pub fn completed(&self, route: Route, total_secs: f64, ttft_secs: f64, prompt_tokens: u32, generated_tokens: u32) {
        self.route(route).completed(total_secs, ttft_secs, prompt_tokens, generated_tokens);
    }
}

/// One route's `onehead_router_requests_total`, a series per code.
struct Requests(Vec<(Code, Counter)>);

impl Requests {
    fn new(registry: &Registry, path: &str) -> Self {
        Requests(
            CODES
                .iter()
                .map(|&code| {
                    let name = code_name(code);
                    let labels = [("code", name.as_str()), ("onehead_route", path)];
                    (code, registry.counter("onehead_router_requests_total", "Requests by final gRPC status.", &labels))
                })
                .collect(),
        )
    }

    fn count(&self, code: Code) {
        let code = if CODES.contains(&code) { code } else { Code::Internal };
        if let Some((_, c)) = self.0.iter().find(|(k, _)| *k == code) {
            c.inc();
        }
    }
}

impl RouteMetrics {
    fn new(registry: &Registry, route: Route) -> Self {
        let gen_ai = [
            ("gen_ai_operation_name", route.operation),
            ("gen_ai_provider_name", "onehead"),
            ("onehead_route", route.path),
        ];
        let requests = Requests::new(registry, route.path);
        let usage = |kind: &str| {
            registry.histogram(
                "gen_ai_client_token_usage",
                "Tokens used per request, by type.",
                &[gen_ai[0], gen_ai[1], gen_ai[2], ("gen_ai_token_type", kind)],
                TOKEN_BUCKETS,
            )
        };
        RouteMetrics {
            requests,
            duration: registry.histogram(
                "gen_ai_server_request_duration_seconds",
                "Time from arrival to the last token.",
                &gen_ai,
                SECONDS_BUCKETS,
            ),
            ttft: registry.histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Time from arrival to the first token.",
                &gen_ai,
                SECONDS_BUCKETS,
            ),
            tpot: registry.histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first.",
                &gen_ai,
                TPOT_BUCKETS,
            ),
            itl: registry.histogram(
                "onehead_router_inter_token_latency_seconds",
                "Time between consecutive streamed tokens of a request.",
                &gen_ai,
                TPOT_BUCKETS,
            ),
            input_tokens: usage("input"),
            output_tokens: usage("output"),
        }
    }

    fn completed(&self, total_secs: f64, ttft_secs: f64, prompt_tokens: u32, generated_tokens: u32) {
        self.requests.count(Code::Ok);
        self.duration.observe(total_secs);
        if generated_tokens > 0 {
            self.ttft.observe(ttft_secs);
        }
        if generated_tokens > 1 {
            self.tpot.observe((total_secs - ttft_secs) / f64::from(generated_tokens - 1));
        }
        self.input_tokens.observe(f64::from(prompt_tokens));
        self.output_tokens.observe(f64::from(generated_tokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case() {
        assert_eq!(code_name(Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(code_name(Code::Ok), "ok");
    }

    #[test]
    fn http_requests_are_counted_under_their_path_or_unmatched() {
        let registry = Registry::default();
        let metrics = RouterMetrics::new(&registry);
        metrics.http_request("/v1/completions", Code::Unauthenticated);
        metrics.http_request(MODELS_PATH, Code::Ok);
        metrics.http_request("/v1/no/such/path", Code::NotFound);
        // A gRPC method's path on the HTTP port is a path the HTTP API does not serve.
        metrics.http_request("/onehead.v1.TextGeneration/Generate", Code::NotFound);
        metrics.http_request("/v1/chat/completions", Code::FailedPrecondition);
        let text = registry.render();
        let value = |code: &str, route: &str| {
            let series = format!("onehead_router_requests_total{{code=\"{code}\",onehead_route=\"{route}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("{series}\n{text}"));
            line[series.len()..].to_owned()
        };
        assert_eq!(value("unauthenticated", "/v1/completions"), "1");
        assert_eq!(value("ok", "/v1/models"), "1");
        assert_eq!(value("not_found", "unmatched"), "2");
        assert_eq!(value("not_found", "/onehead.v1.TextGeneration/Generate"), "0");
        assert_eq!(value("internal", "/v1/chat/completions"), "1");
    }
}
