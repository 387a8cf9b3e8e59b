//! # wgmesh-vclock
//!
//! Virtual wall-clock time for processes that run engines on virtual time:
//! the simulator and the engine's back-to-back tests. Never linked into the
//! daemon.
//!
//! ## Why this exists
//!
//! The engine gives boringtun its time through `mock_instant`, so every
//! `Instant` boringtun reads is virtual. One read is not an `Instant`: when a
//! `Tunn` is created, boringtun's TAI64N handshake stamper reads
//! `SystemTime::now()` once and afterwards adds the (virtual) time elapsed
//! since. On real clocks that is right. On virtual time it is not: a
//! simulated hour passes in milliseconds of wall time, so a `Tunn` created
//! after a trim or a restart stamps its initiations with "wall clock now",
//! which is far *behind* the stamps its predecessor sent (wall clock then plus
//! a virtual hour). The peer rejects them as replays, and the outcome of a run
//! depends on how fast the machine ran it.
//!
//! ## How
//!
//! This crate defines the C symbol `clock_gettime`. In an executable that
//! links it, the static linker binds the standard library's calls (which is
//! where `SystemTime::now()` and `Instant::now()` end up) to this definition
//! instead of the C library's. For `CLOCK_REALTIME` on a thread that has set a
//! virtual wall clock with [`set`] (or [`scoped`]), it answers that value;
//! every other clock, and every thread that has not set one, gets the C
//! library's real answer. So a simulator thread sees the scenario's epoch plus
//! virtual time, while test threads running in parallel, tracing's log
//! timestamps outside a run and the daemon (which never links this crate)
//! see the real clock.
//!
//! The setter takes the symbol's address, so any binary that calls [`set`]
//! is certain to link the definition.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

thread_local! {
    /// This thread's virtual wall clock, as time since the Unix epoch.
    static VIRTUAL_REALTIME: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// Sets this thread's virtual wall clock: `SystemTime::now()` on this thread
/// returns the Unix epoch plus `since_unix_epoch` until the next [`set`] or
/// [`clear`].
pub fn set(since_unix_epoch: Duration) {
    // Taking the address makes the linker keep this crate's `clock_gettime`.
    std::hint::black_box(clock_gettime as *const ());
    VIRTUAL_REALTIME.with(|clock| clock.set(Some(since_unix_epoch)));
}

/// Returns this thread to the real wall clock.
pub fn clear() {
    VIRTUAL_REALTIME.with(|clock| clock.set(None));
}

/// This thread's virtual wall clock, if one is set.
pub fn get() -> Option<Duration> {
    VIRTUAL_REALTIME.with(Cell::get)
}

/// Sets this thread's virtual wall clock until the guard is dropped, then
/// restores what was there before (nested scopes unwind in order).
#[must_use = "the virtual clock is restored when the guard is dropped"]
pub fn scoped(since_unix_epoch: Duration) -> ScopedClock {
    let previous = get();
    set(since_unix_epoch);
    ScopedClock { previous }
}

/// Restores the previous virtual wall clock on drop; see [`scoped`].
#[derive(Debug)]
pub struct ScopedClock {
    previous: Option<Duration>,
}

impl Drop for ScopedClock {
    fn drop(&mut self) {
        VIRTUAL_REALTIME.with(|clock| clock.set(self.previous));
    }
}

/// The C library's `clock_gettime`, found once with `dlsym(RTLD_NEXT)` (it
/// reads the vDSO and costs a few nanoseconds), or 0 before the first lookup.
static REAL_CLOCK_GETTIME: AtomicUsize = AtomicUsize::new(0);

type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;

fn real_clock_gettime() -> Option<ClockGettime> {
    let mut address = REAL_CLOCK_GETTIME.load(Ordering::Relaxed);
    if address == 0 {
        const NAME: &CStr = c"clock_gettime";
        // SAFETY: `dlsym` with `RTLD_NEXT` and a NUL-terminated name only
        // looks the symbol up in the objects loaded after this one; it has no
        // other effect and returns null when there is none.
        address = unsafe { libc::dlsym(libc::RTLD_NEXT, NAME.as_ptr()) } as usize;
        REAL_CLOCK_GETTIME.store(address, Ordering::Relaxed);
    }
    if address == 0 {
        return None;
    }
    // SAFETY: the address is the C library's `clock_gettime`, whose signature
    // is exactly `ClockGettime`.
    Some(unsafe { std::mem::transmute::<usize, ClockGettime>(address) })
}

/// The `clock_gettime` every caller in this executable reaches. It answers
/// `CLOCK_REALTIME` from this thread's virtual wall clock when one is set and
/// passes everything else to the C library (or, if that cannot be found, to
/// the system call).
///
/// # Safety
///
/// The caller passes a valid `timespec` pointer, as for the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(
    clock: libc::clockid_t,
    time: *mut libc::timespec,
) -> libc::c_int {
    if clock == libc::CLOCK_REALTIME && !time.is_null() {
        // `try_with` fails only while the thread is being torn down; the real
        // clock is the right answer then.
        if let Some(since_epoch) = VIRTUAL_REALTIME.try_with(Cell::get).ok().flatten() {
            // SAFETY: the pointer is non-null and, per the function's
            // contract, points at a writable `timespec`.
            unsafe {
                (*time).tv_sec = since_epoch.as_secs() as libc::time_t;
                (*time).tv_nsec = since_epoch.subsec_nanos() as libc::c_long;
            }
            return 0;
        }
    }
    match real_clock_gettime() {
        // SAFETY: same arguments, same contract as our own caller's.
        Some(real) => unsafe { real(clock, time) },
        // SAFETY: the raw system call takes the same two arguments.
        None => unsafe { libc::syscall(libc::SYS_clock_gettime, clock, time) as libc::c_int },
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use super::*;

    fn wall() -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
    }

    #[test]
    fn system_time_follows_the_virtual_clock_only_while_set() {
        let real_before = wall();
        set(Duration::from_secs(1_000));
        assert_eq!(wall(), Duration::from_secs(1_000));
        set(Duration::from_millis(1_234_567));
        assert_eq!(wall(), Duration::from_millis(1_234_567));
        clear();
        let real_after = wall();
        assert!(
            real_after >= real_before,
            "{real_after:?} < {real_before:?}"
        );
        // A date after 2023 shows it is the machine's clock again.
        assert!(real_after > Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn other_threads_and_monotonic_time_are_untouched() {
        let _guard = scoped(Duration::from_secs(5));
        let other = std::thread::spawn(wall).join().unwrap();
        assert!(other > Duration::from_secs(1_700_000_000));
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(start.elapsed() >= Duration::from_millis(2));
        assert_eq!(wall(), Duration::from_secs(5));
    }

    #[test]
    fn scopes_nest_and_restore() {
        clear();
        {
            let _outer = scoped(Duration::from_secs(10));
            {
                let _inner = scoped(Duration::from_secs(20));
                assert_eq!(get(), Some(Duration::from_secs(20)));
            }
            assert_eq!(get(), Some(Duration::from_secs(10)));
        }
        assert_eq!(get(), None);
    }
}
