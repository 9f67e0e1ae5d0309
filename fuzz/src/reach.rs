//! How deep the inputs went: each target counts, per thread, what became of each input (not
//! decoded, refused at a named field, accepted), so that a run shows whether it exercised the
//! checks or only the decoder. The targets stay plain `fn(&[u8])`; the driver reads the counts.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

/// What became of one input on one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    NotDecoded,
    /// Refused, naming this field.
    Refused(&'static str),
    Accepted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::NotDecoded => f.write_str("not decoded"),
            Outcome::Refused(field) => write!(f, "refused at {field}"),
            Outcome::Accepted => f.write_str("accepted"),
        }
    }
}

/// A path through a target (`decoded`, `built`: the request decoded from the bytes, or built
/// field by field from them) and where it ended.
pub type Key = (&'static str, Outcome);

thread_local! {
    static COUNTS: RefCell<BTreeMap<Key, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts one input that took `path` to `outcome`.
pub fn record(path: &'static str, outcome: Outcome) {
    COUNTS.with(|c| *c.borrow_mut().entry((path, outcome)).or_default() += 1);
}

/// The counts since the last call, on this thread.
pub fn take() -> BTreeMap<Key, u64> {
    COUNTS.with(|c| std::mem::take(&mut *c.borrow_mut()))
}
