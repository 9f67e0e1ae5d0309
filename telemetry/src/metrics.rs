//! Counters, gauges and histograms with fixed label sets, rendered as Prometheus text and, when
//! OTLP export is on, recorded into OpenTelemetry instruments of the same meaning (names, units
//! and attribute keys in OpenTelemetry's spelling: `gen_ai.server.time_to_first_token`, `s`,
//! `gen_ai.operation.name`). Without a meter provider those instruments are no-ops.
//!
//! Why not the `prometheus-client` crate (0.26, read for issue 18): it would not make this file
//! shorter, and it would change both the cost of recording and the rendered text. Its
//! `Histogram::observe` takes a mutex where ours makes three atomic updates. It appends `_total`
//! to counter names and `.` to help texts itself, and writes `f64` values through `dtoa` (`3.0`
//! where we write `3`), so the output other tests parse would not stay byte-identical. Its
//! `Registry::register` takes `&mut self`, so the shared handle would still need our mutex, and it
//! knows nothing of OpenTelemetry, so these wrapper types would stay for the mirroring.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::KeyValue;

/// Bucket bounds for durations in seconds, as the GenAI conventions recommend for time to first
/// token and request duration.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

/// A float stored in an `AtomicU64`.
#[derive(Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn add(&self, v: f64) {
        let mut old = self.0.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(old) + v).to_bits();
            match self.0.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => old = seen,
            }
        }
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The OpenTelemetry side of one series: its instrument and attributes.
#[derive(Clone)]
struct Otel<I> {
    instrument: I,
    attributes: Arc<[KeyValue]>,
}

/// A monotonically increasing value.
#[derive(Clone)]
pub struct Counter(Arc<AtomicF64>, Otel<opentelemetry::metrics::Counter<f64>>);

impl Counter {
    pub fn add(&self, v: f64) {
        self.0.add(v);
        self.1.instrument.add(v, &self.1.attributes);
    }
    pub fn inc(&self) {
        self.add(1.0);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct Gauge(Arc<AtomicF64>, Otel<opentelemetry::metrics::Gauge<f64>>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
        self.1.instrument.record(v, &self.1.attributes);
    }
    pub fn add(&self, v: f64) {
        self.0.add(v);
        self.1.instrument.record(self.0.get(), &self.1.attributes);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

struct HistogramState {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    sum: AtomicF64,
    count: AtomicU64,
}

/// A distribution over fixed buckets.
#[derive(Clone)]
pub struct Histogram(Arc<HistogramState>, Otel<opentelemetry::metrics::Histogram<f64>>);

impl Histogram {
    pub fn observe(&self, v: f64) {
        self.1.instrument.record(v, &self.1.attributes);
        let s = &self.0;
        let i = s.bounds.iter().position(|&b| v <= b).unwrap_or(s.bounds.len());
        s.counts[i].fetch_add(1, Ordering::Relaxed);
        s.sum.add(v);
        s.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

enum Kind {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

struct Series {
    labels: String,
    value: Kind,
}

struct Family {
    name: String,
    help: String,
    kind: &'static str,
    series: Vec<Series>,
}

/// All metrics of one process.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<Vec<Family>>>,
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", parts.join(","))
}

impl Registry {
    fn register(&self, name: &str, help: &str, kind: &'static str, labels: &[(&str, &str)], value: Kind) {
        let mut families = self.families.lock().unwrap();
        let labels = render_labels(labels);
        match families.iter_mut().find(|f| f.name == name) {
            Some(f) => {
                assert_eq!(f.kind, kind, "{name} registered as two kinds");
                f.series.push(Series { labels, value });
            }
            None => families.push(Family {
                name: name.into(),
                help: help.into(),
                kind,
                series: vec![Series { labels, value }],
            }),
        }
    }

    /// A counter; `name` should end in `_total`.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        let (otel_name, unit) = otel_name(name);
        let instrument = meter().f64_counter(otel_name).with_unit(unit).with_description(help.to_owned()).build();
        let c = Counter(Arc::default(), Otel { instrument, attributes: attributes(labels) });
        self.register(name, help, "counter", labels, Kind::Counter(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        let (otel_name, unit) = otel_name(name);
        let instrument = meter().f64_gauge(otel_name).with_unit(unit).with_description(help.to_owned()).build();
        let g = Gauge(Arc::default(), Otel { instrument, attributes: attributes(labels) });
        self.register(name, help, "gauge", labels, Kind::Gauge(g.clone()));
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> Histogram {
        let (otel_name, unit) = otel_name(name);
        let instrument = meter()
            .f64_histogram(otel_name)
            .with_unit(unit)
            .with_description(help.to_owned())
            .with_boundaries(bounds.to_vec())
            .build();
        let state = HistogramState {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicF64::default(),
            count: AtomicU64::new(0),
        };
        let h = Histogram(Arc::new(state), Otel { instrument, attributes: attributes(labels) });
        self.register(name, help, "histogram", labels, Kind::Histogram(h.clone()));
        h
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap();
        let mut out = String::new();
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for s in &f.series {
                match &s.value {
                    Kind::Counter(c) => {
                        let _ = writeln!(out, "{}{} {}", f.name, s.labels, c.get());
                    }
                    Kind::Gauge(g) => {
                        let _ = writeln!(out, "{}{} {}", f.name, s.labels, g.get());
                    }
                    Kind::Histogram(h) => render_histogram(&mut out, &f.name, &s.labels, h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let s = &h.0;
    let with_le = |le: &str| {
        if labels.is_empty() {
            format!("{{le=\"{le}\"}}")
        } else {
            format!("{},le=\"{le}\"}}", &labels[..labels.len() - 1])
        }
    };
    let mut cumulative = 0;
    for (i, bound) in s.bounds.iter().enumerate() {
        cumulative += s.counts[i].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{} {cumulative}", with_le(&bound.to_string()));
    }
    cumulative += s.counts[s.bounds.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{} {cumulative}", with_le("+Inf"));
    let _ = writeln!(out, "{name}_sum{labels} {}", s.sum.get());
    let _ = writeln!(out, "{name}_count{labels} {}", s.count.load(Ordering::Relaxed));
}

fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("onehead")
}

/// OpenTelemetry attribute keys are dotted where Prometheus labels use `_`.
fn attributes(labels: &[(&str, &str)]) -> Arc<[KeyValue]> {
    labels.iter().map(|(k, v)| KeyValue::new(k.replace('_', "."), v.to_string())).collect()
}

/// The OpenTelemetry name and UCUM unit of a Prometheus-style name: the GenAI semantic
/// conventions by name; onehead's own as `onehead.<area>.<rest>`, the unit from the suffix.
pub fn otel_name(prometheus: &str) -> (String, &'static str) {
    let known = [
        ("gen_ai_server_time_to_first_token_seconds", "gen_ai.server.time_to_first_token", "s"),
        ("gen_ai_server_time_per_output_token_seconds", "gen_ai.server.time_per_output_token", "s"),
        ("gen_ai_server_request_duration_seconds", "gen_ai.server.request.duration", "s"),
        ("gen_ai_client_token_usage", "gen_ai.client.token.usage", "{token}"),
    ];
    if let Some((_, name, unit)) = known.iter().find(|(p, _, _)| *p == prometheus) {
        return ((*name).to_owned(), unit);
    }
    let base = prometheus.strip_suffix("_total").unwrap_or(prometheus);
    let (base, unit) = if let Some(b) = base.strip_suffix("_bytes_per_second") {
        (b.to_owned(), "By/s")
    } else if let Some(b) = base.strip_suffix("_seconds") {
        (b.to_owned(), "s")
    } else if base.ends_with("_bytes") {
        (base.to_owned(), "By")
    } else {
        (base.to_owned(), "1")
    };
    let mut parts = base.splitn(3, '_');
    let name = match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(rest)) => format!("{a}.{b}.{rest}"),
        (Some(a), Some(b), None) => format!("{a}.{b}"),
        _ => base.clone(),
    };
    (name, unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otel_names_follow_the_conventions() {
        assert_eq!(
            otel_name("gen_ai_server_time_to_first_token_seconds"),
            ("gen_ai.server.time_to_first_token".into(), "s")
        );
        assert_eq!(otel_name("onehead_step_weight_bytes_total"), ("onehead.step.weight_bytes".into(), "By"));
        assert_eq!(otel_name("onehead_step_duration_seconds"), ("onehead.step.duration".into(), "s"));
        assert_eq!(otel_name("onehead_step_bandwidth_bytes_per_second"), ("onehead.step.bandwidth".into(), "By/s"));
        assert_eq!(otel_name("onehead_router_requests_total"), ("onehead.router.requests".into(), "1"));
    }

    #[test]
    fn renders_the_text_format() {
        let r = Registry::default();
        let c = r.counter("onehead_tokens_total", "Tokens.", &[("kind", "out")]);
        let g = r.gauge("onehead_running", "Running sequences.", &[]);
        let h = r.histogram("onehead_step_seconds", "Step time.", &[("tp", "1")], &[0.1, 1.0]);
        c.add(3.0);
        g.set(2.0);
        for v in [0.05, 0.5, 5.0] {
            h.observe(v);
        }
        let text = r.render();
        let expected = r#"# HELP onehead_tokens_total Tokens.
# TYPE onehead_tokens_total counter
onehead_tokens_total{kind="out"} 3
# HELP onehead_running Running sequences.
# TYPE onehead_running gauge
onehead_running 2
# HELP onehead_step_seconds Step time.
# TYPE onehead_step_seconds histogram
onehead_step_seconds_bucket{tp="1",le="0.1"} 1
onehead_step_seconds_bucket{tp="1",le="1"} 2
onehead_step_seconds_bucket{tp="1",le="+Inf"} 3
onehead_step_seconds_sum{tp="1"} 5.55
onehead_step_seconds_count{tp="1"} 3
"#;
        assert_eq!(text, expected);
    }
}
