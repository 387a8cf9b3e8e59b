//! A per-callsite rate limit on the daemon's log lines.
//!
//! Some lines are caused by what other users do (an unanswered TCP SYN into
//! the tunnel logs "outbound connection got no answer" in the engine and
//! "outbound connection failed" in the driver): without a bound, an
//! unprivileged user fills the journal at will (2,000 SYNs made 2,049
//! lines). Each place in the code that logs may write [`LOG_BURST`] lines per
//! [`LOG_WINDOW`]; what it writes beyond that is counted, and
//! [`RateLimit::report_suppressed`] logs one summary line per place.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::subscriber::Interest;
use tracing::{Metadata, warn};
use tracing_subscriber::layer::{Context, Filter};

/// Lines one callsite may write per window.
pub const LOG_BURST: u32 = 20;
/// The window of [`LOG_BURST`].
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Budget {
    window_start: Instant,
    written: u32,
    suppressed: u64,
}

/// The rate limit: a per-layer filter for the log output. Cloning shares
/// the counts.
#[derive(Debug, Clone)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    /// Per callsite, by its name (`event file:line`), which is unique.
    budgets: Arc<Mutex<BTreeMap<&'static str, Budget>>>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new(LOG_BURST, LOG_WINDOW)
    }
}

impl RateLimit {
    /// `burst` lines per callsite per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            budgets: Arc::default(),
        }
    }

    /// True when a line of `callsite` may be written now; counts it either way.
    fn admit(&self, callsite: &'static str, now: Instant) -> bool {
        let Ok(mut budgets) = self.budgets.lock() else {
            return true;
        };
        let budget = budgets.entry(callsite).or_insert(Budget {
            window_start: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(budget.window_start) >= self.window {
            budget.window_start = now;
            budget.written = 0;
        }
        if budget.written < self.burst {
            budget.written += 1;
            true
        } else {
            budget.suppressed += 1;
            false
        }
    }

    /// Takes the counts of suppressed lines, per callsite (zero counts left
    /// out), leaving zeros.
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        let Ok(mut budgets) = self.budgets.lock() else {
            return Vec::new();
        };
        budgets
            .iter_mut()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(name, b)| (*name, std::mem::take(&mut b.suppressed)))
            .collect()
    }

    /// Logs one line per callsite whose lines were suppressed since the last
    /// call. Called from outside the logging path (a timer), so the summary
    /// never re-enters the filter from inside it.
    pub fn report_suppressed(&self) {
        for (callsite, suppressed) in self.take_suppressed() {
            warn!(
                callsite,
                suppressed,
                window_secs = self.window.as_secs(),
                "log lines suppressed by the rate limit"
            );
        }
    }

    /// Reports suppressed lines every `window` on a thread of its own, for
    /// the life of the process.
    pub fn spawn_reporter(&self) -> std::io::Result<()> {
        let limit = self.clone();
        std::thread::Builder::new()
            .name("wgmesh-log-limit".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(limit.window);
                    limit.report_suppressed();
                }
            })
            .map(drop)
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn callsite_enabled(&self, _meta: &'static Metadata<'static>) -> Interest {
        // Never cache: the answer changes with the budget.
        Interest::sometimes()
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        self.admit(event.metadata().name(), Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    /// Counts the events it is handed.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, _event: &tracing::Event<'_>, _cx: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_flood_from_one_callsite_is_cut_to_the_burst_and_counted() {
        let written = Arc::new(AtomicUsize::new(0));
        let limit = RateLimit::new(5, Duration::from_millis(200));
        let subscriber =
            tracing_subscriber::registry().with(Count(written.clone()).with_filter(limit.clone()));
        // One callsite for every line of the flood.
        let flood = |n: u32| {
            for i in 0..n {
                tracing::info!(i, "outbound connection failed");
            }
        };
        tracing::subscriber::with_default(subscriber, || {
            flood(2000);
            assert_eq!(written.load(Ordering::Relaxed), 5);
            // Another place in the code has its own budget.
            tracing::info!("something else");
            assert_eq!(written.load(Ordering::Relaxed), 6);
            let suppressed = limit.take_suppressed();
            assert_eq!(suppressed.len(), 1, "{suppressed:?}");
            assert_eq!(suppressed[0].1, 1995);
            assert!(limit.take_suppressed().is_empty());
            // A new window lets lines through again.
            std::thread::sleep(Duration::from_millis(250));
            flood(3);
        });
        assert_eq!(written.load(Ordering::Relaxed), 9);
    }
}
