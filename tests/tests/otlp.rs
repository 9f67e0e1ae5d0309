//! OTLP: a real OTLP/gRPC receiver on 127.0.0.1 (built from `opentelemetry-proto`) gets the
//! router's and the worker's spans, connected in one trace that the client started, and their
//! metrics (the GenAI ones and the per-step bytes).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_tests::{Proc, text_request};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span received, with its service name; every metric name, with its service name.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>, Arc<Mutex<Vec<(String, String)>>>);

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.1.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            let service = service_name(rm.resource.iter().flat_map(|r| &r.attributes));
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().filter(|m| m.data.is_some()).map(|m| (service.clone(), m.name)));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

fn service_name<'a>(attributes: impl Iterator<Item = &'a opentelemetry_proto::tonic::common::v1::KeyValue>) -> String {
    let mut attributes = attributes;
    attributes.find(|a| a.key == "service.name").and_then(|a| a.value.as_ref()?.value.clone()).map_or(
        String::new(),
        |v| match v {
            Value::StringValue(s) => s,
            other => format!("{other:?}"),
        },
    )
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = service_name(rs.resource.iter().flat_map(|r| &r.attributes));
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn str_attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(v) => Some(v.as_str()),
        _ => None,
    })
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::IntValue(v) => Some(*v),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_in_one_trace_and_metrics_arrive_over_otlp() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server.clone()))
            .add_service(MetricsServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ];
    let w = Proc::start_with_env(
        "onehead-worker",
        &["serve", "--model", "builtin:tiny", "--threads", "1", "--listen", "127.0.0.1:0"],
        &env,
    )
    .await;
    w.wait_serving().await;
    let r = Proc::start_with_env(
        "onehead-router",
        &["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--worker", &w.url()],
        &env,
    )
    .await;
    r.wait_serving().await;

    // The client starts the trace (W3C traceparent); the router continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(text_request("trace me", 5));
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    let mut client = pb::text_generation_client::TextGenerationClient::new(r.channel().await);
    assert_eq!(client.generate(request).await.unwrap().into_inner().tokens.len(), 5);
    // So does the HTTP API, for a `traceparent` header.
    let http_trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("00-{http_trace_id}-00f067aa0ba902b8-01");
    let chat = serde_json::json!({"messages": [{"role": "user", "content": "trace me"}], "max_tokens": 3});
    let http_addr = r.http_addr.clone().unwrap();
    let answer =
        onehead_tests::http(&http_addr, "POST", "/v1/chat/completions", &[("traceparent", &traceparent)], Some(&chat))
            .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let hex = |id: &[u8]| id.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        {
            let spans = receiver.0.lock().unwrap();
            let router =
                spans.iter().find(|(_, s)| s.name == "onehead.router.generate" && hex(&s.trace_id) == trace_id);
            let worker =
                spans.iter().find(|(_, s)| s.name == "onehead.worker.generation" && hex(&s.trace_id) == trace_id);
            let step = spans
                .iter()
                .find(|(_, s)| s.name == "onehead.step" && int_attribute(s, "onehead.step.weight_bytes").is_some());
            let http =
                spans.iter().find(|(_, s)| s.name == "onehead.router.generate" && hex(&s.trace_id) == http_trace_id);
            if let (Some((router_service, router)), Some((worker_service, worker)), Some((_, step)), Some((_, http))) =
                (router, worker, step, http)
            {
                assert_eq!(
                    hex(&http.parent_span_id),
                    "00f067aa0ba902b8",
                    "the HTTP request's span is the client's child"
                );
                assert_eq!(str_attribute(http, "onehead.route"), Some("/v1/chat/completions"));
                assert_eq!(str_attribute(http, "gen_ai.operation.name"), Some("chat"));
                assert_eq!(str_attribute(router, "onehead.route"), Some("/onehead.v1.TextGeneration/Generate"));
                assert_eq!((router_service.as_str(), worker_service.as_str()), ("onehead-router", "onehead-worker"));
                assert_eq!(worker.parent_span_id, router.span_id, "the worker's span is the router's child");
                assert_eq!(hex(&router.parent_span_id), "00f067aa0ba902b7", "the router's span is the client's child");
                assert_eq!(int_attribute(router, "gen_ai.usage.output_tokens"), Some(5));
                assert!(int_attribute(step, "onehead.step.weight_bytes").unwrap() > 0);
                assert!(int_attribute(step, "onehead.step.kv_written_bytes").unwrap() > 0);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "spans did not arrive: {:?}",
            receiver.0.lock().unwrap().iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Metrics, in OpenTelemetry's names.
    let wanted = [
        ("onehead-router", "gen_ai.server.time_to_first_token"),
        ("onehead-router", "gen_ai.server.request.duration"),
        ("onehead-router", "gen_ai.client.token.usage"),
        ("onehead-worker", "onehead.step.weight_bytes"),
        ("onehead-worker", "onehead.step.kv_read_mha_equivalent_bytes"),
    ];
    loop {
        let missing: Vec<_> = {
            let names = receiver.1.lock().unwrap();
            wanted.iter().filter(|(svc, m)| !names.iter().any(|(s, n)| s == svc && n == m)).collect()
        };
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "metrics did not arrive: {missing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
