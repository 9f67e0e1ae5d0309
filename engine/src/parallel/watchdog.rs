//! The bookkeeping of the NCCL group's watchdog: which collectives each shard has enqueued and
//! not yet seen complete, and whether the group has failed. Pure (the events are a type
//! parameter and time is passed in), so that its rules are tested on CPU; `nccl.rs` feeds it
//! CUDA events and aborts the communicators when it says so.
//!
//! The design follows PyTorch's ProcessGroupNCCL watchdog: every collective records an event
//! after itself on the shard's stream; a thread polls the oldest pending event of each shard
//! and, when one has waited longer than the timeout or failed, aborts every communicator of the
//! group, which ends the hung kernels so that the host calls waiting on them return.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Why a group stopped. The first failure wins; the group stays failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// Shard `rank` failed between collectives (`Communicator::poison`).
    Poisoned { rank: usize },
    /// Shard `rank`'s `what` had not completed `waited` after it was enqueued.
    TimedOut { rank: usize, what: &'static str, waited: Duration },
    /// `call` reported an error for shard `rank`.
    Error { rank: usize, call: &'static str, message: String },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Poisoned { rank } => write!(f, "shard {rank} failed between collectives"),
            Failure::TimedOut { rank, what, waited } => {
                write!(f, "shard {rank}'s {what} had not completed {:.1} s after it was enqueued", waited.as_secs_f64())
            }
            Failure::Error { rank, call, message } => write!(f, "shard {rank}: {call}: {message}"),
        }
    }
}

/// Where one piece of asynchronous work stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    Done,
    Running,
    Failed(String),
}

/// One enqueued collective: `event` completes when it does.
struct Pending<E> {
    what: &'static str,
    issued: Instant,
    event: E,
}

/// The outcome of one [`Watch::sweep`].
pub struct Sweep<E> {
    /// Events of completed collectives (and, once the group has failed, of all pending ones),
    /// for the caller to release.
    pub released: Vec<E>,
    /// The failure this sweep found, if it is the group's first: the caller then aborts.
    pub failed: Option<Failure>,
}

/// The collectives in flight per shard and the group's state.
pub struct Watch<E> {
    timeout: Duration,
    /// Per rank, oldest first. A shard enqueues on one stream, so its collectives complete in
    /// this order and only the oldest needs polling.
    pending: Vec<VecDeque<Pending<E>>>,
    failure: Option<Failure>,
}

impl<E> Watch<E> {
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        Watch { timeout, pending: (0..world_size).map(|_| VecDeque::new()).collect(), failure: None }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The group's failure, once it has one.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Records that shard `rank` enqueued `what`, which `event` marks the end of. Once the
    /// group has failed nothing more is watched: `Err` hands the event back for release.
    pub fn issue(&mut self, rank: usize, what: &'static str, event: E, now: Instant) -> Result<(), E> {
        if self.failure.is_some() {
            return Err(event);
        }
        self.pending[rank].push_back(Pending { what, issued: now, event });
        Ok(())
    }

    /// Marks the group failed. The first time, returns every pending event for release (the
    /// caller then aborts the communicators); afterwards `None`: the first failure stands.
    pub fn fail(&mut self, failure: Failure) -> Option<Vec<E>> {
        if self.failure.is_some() {
            return None;
        }
        self.failure = Some(failure);
        Some(self.take_pending())
    }

    /// Looks at each shard's oldest pending collectives at `now`, `progress` polling an event:
    /// completed ones leave; one that failed, or has been pending longer than the timeout,
    /// fails the group.
    pub fn sweep(&mut self, now: Instant, mut progress: impl FnMut(usize, &E) -> Progress) -> Sweep<E> {
        let mut released = Vec::new();
        let mut found = None;
        for (rank, queue) in self.pending.iter_mut().enumerate() {
            while let Some(oldest) = queue.front() {
                match progress(rank, &oldest.event) {
                    Progress::Done => released.extend(queue.pop_front().map(|p| p.event)),
                    Progress::Running => {
                        let waited = now.saturating_duration_since(oldest.issued);
                        if waited > self.timeout {
                            found.get_or_insert(Failure::TimedOut { rank, what: oldest.what, waited });
                        }
                        break;
                    }
                    Progress::Failed(message) => {
                        found.get_or_insert(Failure::Error { rank, call: oldest.what, message });
                        break;
                    }
                }
            }
        }
        let failed = found.and_then(|f| {
            let events = self.fail(f.clone())?;
            released.extend(events);
            Some(f)
        });
        Sweep { released, failed }
    }

    /// Takes every pending event (at teardown, to release them).
    pub fn take_pending(&mut self) -> Vec<E> {
        self.pending.iter_mut().flat_map(|q| q.drain(..).map(|p| p.event)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Events are numbers; `done` lists the completed ones.
    fn sweep(watch: &mut Watch<u32>, now: Instant, done: &[u32]) -> Sweep<u32> {
        watch.sweep(now, |_, e| if done.contains(e) { Progress::Done } else { Progress::Running })
    }

    #[test]
    fn completed_collectives_leave_in_order_and_a_slow_one_is_not_yet_a_failure() {
        let t0 = Instant::now();
        let mut watch = Watch::new(2, TIMEOUT);
        for (rank, event) in [(0, 1), (0, 2), (0, 3), (1, 10)] {
            watch.issue(rank, "all_reduce", event, t0).unwrap();
        }
        // Rank 0: 1 and 2 done, 3 running; 4 is done but waits behind 3 (one stream, in order).
        watch.issue(0, "all_gather", 4, t0).unwrap();
        let s = sweep(&mut watch, t0 + TIMEOUT, &[1, 2, 4, 10]);
        assert_eq!(s.released, vec![1, 2, 10]);
        assert_eq!(s.failed, None);
        let s = sweep(&mut watch, t0 + TIMEOUT, &[3, 4]);
        assert_eq!(s.released, vec![3, 4]);
        assert!(watch.failure().is_none());
    }

    #[test]
    fn a_collective_pending_past_the_timeout_fails_the_group_once() {
        let t0 = Instant::now();
        let mut watch = Watch::new(2, TIMEOUT);
        watch.issue(0, "all_reduce", 1, t0).unwrap();
        watch.issue(1, "all_gather", 2, t0 + Duration::from_secs(1)).unwrap();
        watch.issue(1, "all_reduce", 3, t0 + Duration::from_secs(2)).unwrap();
        let s = sweep(&mut watch, t0 + Duration::from_secs(11), &[1]);
        // 10 s is not past a 10 s timeout: nothing yet.
        assert_eq!((s.released, s.failed), (vec![1], None));
        let s = sweep(&mut watch, t0 + Duration::from_millis(11_001), &[]);
        let waited = Duration::from_millis(10_001);
        assert_eq!(s.failed, Some(Failure::TimedOut { rank: 1, what: "all_gather", waited }));
        // Every pending event comes back, and nothing more is watched.
        assert_eq!(s.released, vec![2, 3]);
        assert_eq!(watch.issue(0, "all_reduce", 4, t0), Err(4));
        let later = sweep(&mut watch, t0 + Duration::from_secs(100), &[]);
        assert_eq!((later.released, later.failed), (vec![], None));
        assert!(watch.failure().unwrap().to_string().contains("shard 1's all_gather had not completed 10.0 s"));
    }

    #[test]
    fn an_event_error_fails_the_group() {
        let t0 = Instant::now();
        let mut watch = Watch::new(1, TIMEOUT);
        watch.issue(0, "broadcast", 7, t0).unwrap();
        let s = watch.sweep(t0, |_, _| Progress::Failed("cudaErrorIllegalAddress".into()));
        let failure = Failure::Error { rank: 0, call: "broadcast", message: "cudaErrorIllegalAddress".into() };
        assert_eq!((s.released, s.failed), (vec![7], Some(failure)));
    }

    #[test]
    fn the_first_failure_stands_and_poison_releases_the_pending_events() {
        let t0 = Instant::now();
        let mut watch = Watch::new(3, TIMEOUT);
        watch.issue(2, "all_reduce", 5, t0).unwrap();
        assert_eq!(watch.fail(Failure::Poisoned { rank: 1 }), Some(vec![5]));
        assert_eq!(watch.fail(Failure::Poisoned { rank: 0 }), None);
        assert_eq!(watch.failure(), Some(&Failure::Poisoned { rank: 1 }));
        assert_eq!(watch.failure().unwrap().to_string(), "shard 1 failed between collectives");
    }
}
