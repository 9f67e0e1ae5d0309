//! One worker's health as a plain state machine: the health loop (`discovery.rs`) and failed
//! requests (`service.rs`) feed it events and log what each one changed; `Pool` holds one per
//! worker and sends requests only to workers that are in.
//!
//! A worker is in after a passing health check. It is out after `FAILED_CHECKS` failed checks in
//! a row, or at once when a request to it fails; the next passing check lets it back in. A worker
//! that serves another model than the cluster's is refused until a later description (fetched
//! when the worker restarts) shows the cluster's model.

/// Failed checks in a row that take a worker out, as Kubernetes' probes count them: one slow
/// answer from a busy machine is not a dead worker, and with one worker it would fail every
/// request that arrives before the next round.
pub const FAILED_CHECKS: u32 = 3;

/// A worker's health as the router judges it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Passing its health checks; a refused worker never is.
    healthy: bool,
    /// Health checks failed in a row.
    failed_checks: u32,
    /// Why the worker is refused (it serves another model), if it is.
    refused: Option<String>,
}

/// What an event changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing that decides where requests go.
    None,
    /// A check failed; the worker stays in until `FAILED_CHECKS` fail in a row.
    CheckFailed { failed_checks: u32 },
    /// The worker is out: too many failed checks in a row, or a failed request.
    Out { failed_checks: u32 },
    /// The worker is in: its first passing check, or the first after it was out.
    In,
    /// The worker serves another model, and is refused.
    Refused(String),
}

impl Health {
    /// Whether requests may go to the worker.
    pub fn is_in(&self) -> bool {
        self.healthy && self.refused.is_none()
    }

    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// A health check answered. `model` is the verdict on the worker's model when this check
    /// also fetched its description (the first passing one, and the first after each restart):
    /// `Err(why)` refuses the worker, `Ok` lifts an earlier refusal.
    pub fn on_check_ok(&mut self, model: Option<Result<(), String>>) -> Change {
        let newly_refused = match model {
            Some(Err(why)) => {
                self.refused = Some(why.clone());
                Some(why)
            }
            Some(Ok(())) => {
                self.refused = None;
                None
            }
            None => None,
        };
        self.failed_checks = 0;
        let was = self.healthy;
        self.healthy = self.refused.is_none();
        match newly_refused {
            Some(why) => Change::Refused(why),
            None if !was && self.healthy => Change::In,
            None => Change::None,
        }
    }

    /// A health check failed or did not answer in time.
    pub fn on_check_failed(&mut self) -> Change {
        self.failed_checks += 1;
        if !self.healthy {
            Change::None
        } else if self.failed_checks >= FAILED_CHECKS {
            self.healthy = false;
            Change::Out { failed_checks: self.failed_checks }
        } else {
            Change::CheckFailed { failed_checks: self.failed_checks }
        }
    }

    /// A request to the worker failed: it is out at once, until a health check passes.
    pub fn on_request_failed(&mut self) -> Change {
        if !self.healthy {
            return Change::None;
        }
        self.healthy = false;
        Change::Out { failed_checks: self.failed_checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a new worker `events` (`ok`: a passing check, `ok+`: a passing check that fetched a
    /// description of the cluster's model, `ok!`: one of another model, `fail`: a failed check,
    /// `req`: a failed request); `expected` is what each changed (`-` for nothing), then whether
    /// the worker ends in or out.
    fn check(events: &str, expected: &str) {
        let mut health = Health::default();
        let changes: Vec<String> = events
            .split_whitespace()
            .map(|event| match event {
                "ok" => health.on_check_ok(None),
                "ok+" => health.on_check_ok(Some(Ok(()))),
                "ok!" => health.on_check_ok(Some(Err("another model".into()))),
                "fail" => health.on_check_failed(),
                "req" => health.on_request_failed(),
                _ => panic!("unknown event {event:?}"),
            })
            .map(|change| match change {
                Change::None => "-".to_owned(),
                Change::CheckFailed { failed_checks } => format!("failing({failed_checks})"),
                Change::Out { failed_checks } => format!("out({failed_checks})"),
                Change::In => "in".to_owned(),
                Change::Refused(why) => format!("refused({why})"),
            })
            .collect();
        let end = if health.is_in() { "in" } else { "out" };
        assert_eq!(format!("{} => {end}", changes.join(" ")), expected, "{events}");
    }

    #[test]
    fn transitions() {
        check("", " => out");
        check("ok", "in => in");
        check("ok ok", "in - => in");
        // Two failed checks keep a worker in; the third takes it out.
        check("ok fail fail", "in failing(1) failing(2) => in");
        check("ok fail fail fail", "in failing(1) failing(2) out(3) => out");
        check("ok fail fail fail fail", "in failing(1) failing(2) out(3) - => out");
        // A passing check resets the count.
        check("ok fail fail ok fail fail", "in failing(1) failing(2) - failing(1) failing(2) => in");
        // A failed request takes the worker out at once.
        check("ok req", "in out(0) => out");
        check("ok fail req", "in failing(1) out(1) => out");
        check("ok req req fail", "in out(0) - - => out");
        // A worker that answers again is back in, whichever way it went out.
        check("ok req ok", "in out(0) in => in");
        check("ok fail fail fail ok", "in failing(1) failing(2) out(3) in => in");
        check("ok req ok fail fail", "in out(0) in failing(1) failing(2) => in");
        // A worker never in: failures change nothing until it answers.
        check("fail fail fail req ok", "- - - - in => in");
        check("req", "- => out");
        // A worker of another model is refused, and stays out whatever it answers.
        check("ok!", "refused(another model) => out");
        check("ok! ok ok", "refused(another model) - - => out");
        check("ok! fail req", "refused(another model) - - => out");
        // ... until it restarts with the cluster's model (and back if it restarts again).
        check("ok+ ok! fail ok+", "in refused(another model) - in => in");
        check("ok! ok+ ok!", "refused(another model) in refused(another model) => out");
    }

    #[test]
    fn a_check_without_a_model_verdict_lets_a_worker_in_until_one_refuses_it() {
        let mut health = Health::default();
        assert_eq!(health.on_check_ok(None), Change::In);
        assert_eq!(health.refused(), None);
        assert_eq!(health.on_check_ok(None), Change::None);
        assert_eq!(health.on_check_ok(Some(Err("m".into()))), Change::Refused("m".into()));
        assert_eq!((health.is_in(), health.refused()), (false, Some("m")));
    }
}
