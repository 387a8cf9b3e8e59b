//! The tracing subscriber the event backend installs while it runs
//! engines: it counts ERROR-level logs, which the invariants read.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

/// Counts ERROR-level log events: ours (a broken invariant) apart from
/// boringtun's (which logs a handshake that gave up at ERROR).
#[derive(Debug, Default)]
pub(super) struct ErrorCounter {
    pub(super) ours: AtomicU64,
    pub(super) boringtun: AtomicU64,
    next_span: AtomicU64,
}

impl tracing::Subscriber for ErrorCounter {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_span.fetch_add(1, AtomicOrdering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target().starts_with("boringtun") {
            self.boringtun.fetch_add(1, AtomicOrdering::Relaxed);
        } else {
            self.ours.fetch_add(1, AtomicOrdering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
