//! The router's metrics: requests by outcome, and the GenAI server timings and token usage.

use onehead_telemetry::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};
use tonic::Code;

const GEN_AI: [(&str, &str); 2] = [("gen_ai_operation_name", "text_completion"), ("gen_ai_provider_name", "onehead")];
/// Token-count buckets recommended for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// Buckets for time per output token.
const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
const CODES: [Code; 8] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::ResourceExhausted,
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::Internal,
    Code::Cancelled,
    Code::Unauthenticated,
];

pub struct RouterMetrics {
    requests: Vec<(Code, Counter)>,
    duration: Histogram,
    ttft: Histogram,
    tpot: Histogram,
    itl: Histogram,
    input_tokens: Histogram,
    output_tokens: Histogram,
    pub in_flight: Gauge,
    pub healthy_workers: Gauge,
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
        let requests = CODES
            .iter()
            .map(|&code| {
                let name = code_name(code);
                (
                    code,
                    registry.counter(
                        "onehead_router_requests_total",
                        "Requests by final gRPC status.",
                        &[("code", &name)],
                    ),
                )
            })
            .collect();
        let usage = |kind: &str| {
            registry.histogram(
                "gen_ai_client_token_usage",
                "Tokens used per request, by type.",
                &[GEN_AI[0], GEN_AI[1], ("gen_ai_token_type", kind)],
                TOKEN_BUCKETS,
            )
        };
        RouterMetrics {
            requests,
            duration: registry.histogram(
                "gen_ai_server_request_duration_seconds",
                "Time from arrival to the last token.",
                &GEN_AI,
                SECONDS_BUCKETS,
            ),
            ttft: registry.histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Time from arrival to the first token.",
                &GEN_AI,
                SECONDS_BUCKETS,
            ),
            tpot: registry.histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first.",
                &GEN_AI,
                TPOT_BUCKETS,
            ),
            itl: registry.histogram(
                "onehead_router_inter_token_latency_seconds",
                "Time between consecutive streamed tokens of a request.",
                &GEN_AI,
                TPOT_BUCKETS,
            ),
            input_tokens: usage("input"),
            output_tokens: usage("output"),
            in_flight: registry.gauge("onehead_router_requests_in_flight", "Requests admitted and not finished.", &[]),
            healthy_workers: registry.gauge("onehead_router_healthy_workers", "Workers passing health checks.", &[]),
        }
    }

    /// A request ended with `code`.
    pub fn request(&self, code: Code) {
        let code = if CODES.contains(&code) { code } else { Code::Internal };
        if let Some((_, c)) = self.requests.iter().find(|(k, _)| *k == code) {
            c.inc();
        }
    }

    /// The gap between two consecutive tokens of one request.
    pub fn inter_token(&self, secs: f64) {
        self.itl.observe(secs);
    }

    /// A completed generation.
    pub fn completed(&self, total_secs: f64, ttft_secs: f64, prompt_tokens: u32, generated_tokens: u32) {
        self.request(Code::Ok);
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
    #[test]
    fn codes_are_snake_case() {
        assert_eq!(super::code_name(tonic::Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(super::code_name(tonic::Code::Ok), "ok");
    }
}
