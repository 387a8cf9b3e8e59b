//! The batched UDP socket's receive side: the messages of `recvmmsg` (each
//! one datagram or a GRO run of them), held in a small ring and handed out
//! one datagram at a time, in arrival order except for short datagrams
//! when reading ahead is on.
//!
//! Why short datagrams go first: the socket is first in, first out, and
//! under a bulk transfer its buffer holds milliseconds of datagrams (see
//! `bench/throughput/README.md`, "four flows' loaded RTT"). A ping or an SSH
//! keystroke is a short datagram; reading the socket ahead of the engine
//! finds it behind the bulk data, and handing it to the engine first
//! takes it past that data (by at most [`EARLY_REACH_DATAGRAMS`], so
//! everything passed stays inside WireGuard's replay window). Short
//! datagrams pass only long ones, never each other. Every
//! datagram handed out carries its place in arrival order (a sequence
//! number), so what is decrypted from a short datagram of a bulk flow (the
//! short last segment of a write) can be put back in its place before it
//! reaches the TUN ([`super::rx_order`]): no flow sees its own packets
//! reordered.

use std::collections::VecDeque;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::udp::unmap;

/// Messages per `recvmmsg` at most.
const RECV_BATCH: usize = 16;
/// Messages held at most while reading ahead (their buffers are allocated
/// once: 2 MB, about 1,400 full-sized datagrams).
const RECV_SLOTS: usize = 32;
/// Room per received message: a GRO run of up to 64 KB.
const RECV_BUFFER: usize = 65536;
/// Room for a received message's control messages: the GRO segment size
/// (an int) and the arrival time (a timespec), with their headers.
const RECV_CMSG_ROOM: usize = 128;
/// How far a short datagram may be handed out ahead of the oldest datagram
/// not yet handed out. WireGuard accepts a counter up to 1,024 behind the
/// highest it has seen, and one peer's datagrams arrive with their counters
/// in order: so nothing passed is refused as a replay.
const EARLY_REACH_DATAGRAMS: u64 = 1000;
/// Datagrams this long or shorter may be handed out ahead of their turn:
/// pings, TCP segments of a few hundred bytes and less, handshakes,
/// keepalives and disco messages. A full-sized segment of a bulk flow never
/// is.
const SHORT_DATAGRAM: usize = 256;
/// While reading ahead, the socket is read again once this many slots are
/// free, so the reading costs one system call per few messages.
const TOP_UP_SLOTS: usize = 4;

/// One datagram handed out: where it lies in its slot, its source and its
/// place in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Datagram {
    pub(super) slot: usize,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) from: SocketAddr,
    /// Its place among every datagram this socket received.
    pub(super) seq: u64,
    /// Handed out ahead of datagrams that arrived before it.
    pub(super) early: bool,
    /// Handed out early as the short last datagram of a GRO run (not a
    /// message of short datagrams).
    pub(super) tail: bool,
}

/// One received message: one datagram or a GRO run of equal-sized ones (the
/// last may be shorter).
#[derive(Debug, Clone, Copy)]
struct Message {
    slot: usize,
    len: usize,
    /// Segment size (the message's length when it is one datagram).
    seg: usize,
    from: SocketAddr,
    /// When the kernel received it (`SO_TIMESTAMPNS`, time since the Unix
    /// epoch), if it said.
    stamp: Option<Duration>,
    /// The sequence number of its first datagram.
    first_seq: u64,
    /// Where its short datagrams begin (all of it when its segments are
    /// short, its last datagram when only that one is), if it has any.
    short_from: Option<usize>,
    /// Its short datagrams were handed out early: the walk in order ends
    /// at `short_from`.
    short_taken: bool,
}

impl Message {
    /// Where the walk in arrival order ends in this message.
    fn in_order_end(&self) -> usize {
        match (self.short_taken, self.short_from) {
            (true, Some(from)) => from,
            _ => self.len,
        }
    }

    fn seq_at(&self, offset: usize) -> u64 {
        self.first_seq + (offset / self.seg) as u64
    }
}

/// The short datagrams of one message being handed out early.
#[derive(Debug, Clone, Copy)]
struct EarlyRun {
    /// The message's index in the queue.
    index: usize,
    offset: usize,
}

/// Received messages and the walk through their datagrams.
pub(super) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// Slots not holding a message.
    free: Vec<usize>,
    /// Messages in arrival order; the walk is in the first.
    queue: VecDeque<Message>,
    /// The walk's offset in the first message.
    offset: usize,
    /// The sequence number the next message read gets.
    next_seq: u64,
    /// Messages behind the first with short datagrams not handed out yet.
    short_waiting: usize,
    /// Short datagrams being handed out early.
    early: Option<EarlyRun>,
    /// Whether the socket is read ahead and short datagrams go first.
    read_ahead: bool,
    /// A message was used up since the socket was last read.
    consumed: bool,
    /// The arrival time of the message whose first datagram was handed out
    /// last, until the socket takes it.
    pub(super) arrived: Option<Duration>,
}

impl RecvBatch {
    /// An empty batch; `read_ahead`: read the socket ahead of the walk and
    /// hand short datagrams out first.
    pub(super) fn new(read_ahead: bool) -> Self {
        let slots = if read_ahead { RECV_SLOTS } else { RECV_BATCH };
        Self {
            bufs: (0..slots).map(|_| vec![0; RECV_BUFFER]).collect(),
            free: (0..slots).rev().collect(),
            queue: VecDeque::with_capacity(slots),
            offset: 0,
            next_seq: 0,
            short_waiting: 0,
            early: None,
            read_ahead,
            consumed: false,
            arrived: None,
        }
    }

    /// Whether every datagram has been handed out.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The bytes of a handed-out datagram.
    pub(super) fn bytes(&self, datagram: &Datagram) -> &[u8] {
        &self.bufs[datagram.slot][datagram.start..datagram.end]
    }

    /// Messages one read may take: bounded by free slots and by
    /// [`RECV_BATCH`].
    fn read_room(&self) -> usize {
        self.free.len().min(RECV_BATCH)
    }

    /// Whether the socket should be read now although datagrams are still
    /// held: reading ahead is on, a message was used up since the last
    /// read, and [`TOP_UP_SLOTS`] slots are free.
    pub(super) fn wants_top_up(&self) -> bool {
        self.read_ahead && self.consumed && !self.is_empty() && self.read_room() >= TOP_UP_SLOTS
    }

    /// Adds one received message (`seg` 0: one datagram).
    fn add(
        &mut self,
        slot: usize,
        len: usize,
        seg: usize,
        from: SocketAddr,
        stamp: Option<Duration>,
    ) {
        if len == 0 {
            // An empty datagram carries nothing for the engine.
            self.free.push(slot);
            return;
        }
        let seg = if seg == 0 || seg > len { len } else { seg };
        let tail = len % seg;
        let short_from = if !self.read_ahead {
            None
        } else if seg <= SHORT_DATAGRAM {
            Some(0)
        } else if tail != 0 && tail <= SHORT_DATAGRAM {
            Some(len - tail)
        } else {
            None
        };
        let first_seq = self.next_seq;
        self.next_seq += len.div_ceil(seg) as u64;
        if short_from.is_some() && !self.queue.is_empty() {
            self.short_waiting += 1;
        }
        self.queue.push_back(Message {
            slot,
            len,
            seg,
            from,
            stamp,
            first_seq,
            short_from,
            short_taken: false,
        });
    }

    /// The next datagram: the next short one waiting behind the first
    /// message when reading ahead, else the next in arrival order.
    pub(super) fn next_datagram(&mut self) -> Option<Datagram> {
        if let Some(datagram) = self.next_early() {
            return Some(datagram);
        }
        loop {
            let first = *self.queue.front()?;
            let end = first.in_order_end();
            if self.offset >= end {
                self.pop_first();
                continue;
            }
            let start = self.offset;
            let stop = (start + first.seg).min(first.len);
            if start == 0 {
                self.arrived = first.stamp;
            }
            self.offset = stop;
            if stop >= end {
                self.pop_first();
            }
            return Some(Datagram {
                slot: first.slot,
                start,
                end: stop,
                from: first.from,
                seq: first.seq_at(start),
                early: false,
                tail: false,
            });
        }
    }

    /// The first message is used up: its slot is free again; the next
    /// message's short datagrams, if it has any waiting, are now in order.
    fn pop_first(&mut self) {
        if let Some(done) = self.queue.pop_front() {
            self.free.push(done.slot);
            self.consumed = true;
        }
        // (The walk runs only while no early run is in progress, so no
        // early run's index moves here.)
        self.offset = 0;
        if let Some(next) = self.queue.front() {
            if next.short_from.is_some() && !next.short_taken {
                self.short_waiting -= 1;
            }
        }
    }

    /// The next short datagram handed out ahead of its turn: the first
    /// short datagram not handed out yet, when long ones wait before it
    /// (short datagrams keep their order among themselves; they only pass
    /// long ones) and it is within [`EARLY_REACH_DATAGRAMS`] of the walk.
    fn next_early(&mut self) -> Option<Datagram> {
        if self.early.is_none() {
            if self.short_waiting == 0 {
                return None;
            }
            let first = *self.queue.front()?;
            if first.short_from.is_some() && !first.short_taken {
                // A short datagram the walk will reach comes first.
                return None;
            }
            let head = first.seq_at(self.offset);
            let index = self
                .queue
                .iter()
                .skip(1)
                .position(|m| m.short_from.is_some() && !m.short_taken)?
                + 1;
            let first_has_long = first.seg > SHORT_DATAGRAM && self.offset < first.in_order_end();
            let message = &mut self.queue[index];
            let short_from = message.short_from.unwrap_or(0);
            // The messages between the first and this one have no short
            // datagrams left, so they are long ones; so is the start of a
            // run whose short tail this is.
            let passes_long = first_has_long || index > 1 || short_from > 0;
            // Messages are in arrival order: when the nearest is out of
            // reach, so are the others.
            let last_seq = message.seq_at(message.len - 1);
            if !passes_long || last_seq - head >= EARLY_REACH_DATAGRAMS {
                return None;
            }
            message.short_taken = true;
            self.short_waiting -= 1;
            self.early = Some(EarlyRun {
                index,
                offset: short_from,
            });
        }
        let run = self.early?;
        let message = self.queue[run.index];
        let start = run.offset;
        let stop = (start + message.seg).min(message.len);
        if stop >= message.len {
            self.early = None;
        } else {
            self.early = Some(EarlyRun {
                offset: stop,
                ..run
            });
        }
        Some(Datagram {
            slot: message.slot,
            start,
            end: stop,
            from: message.from,
            seq: message.seq_at(start),
            early: true,
            tail: message.short_from.is_some_and(|from| from > 0),
        })
    }

    /// Copies the next datagram into `buf`; returns its length, source and
    /// the datagram (tests).
    #[cfg(test)]
    pub(super) fn pop_into(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr, Datagram)> {
        let datagram = self.next_datagram()?;
        let bytes = self.bytes(&datagram);
        let len = bytes.len().min(buf.len());
        buf[..len].copy_from_slice(&bytes[..len]);
        Some((len, datagram.from, datagram))
    }

    /// One `recvmmsg` on `fd` into the free slots (at most
    /// [`RECV_BATCH`] messages), appended to the held ones.
    /// Returns the number of messages kept (truncated ones and unknown
    /// families are dropped). `WouldBlock` when nothing was ready.
    pub(super) fn fill(&mut self, fd: RawFd) -> io::Result<usize> {
        self.consumed = false;
        let room = self.read_room();
        if room == 0 {
            // No slot is free before the walk moves on; not an error, and
            // not "nothing ready" either.
            return Ok(0);
        }
        // The slots this call reads into, on the stack: `fill` runs for
        // every read, including the many that find nothing.
        let mut taken = [0usize; RECV_BATCH];
        let mut n = 0;
        while n < room.min(RECV_BATCH) {
            let Some(slot) = self.free.pop() else { break };
            taken[n] = slot;
            n += 1;
        }
        let slots = &taken[..n];
        // SAFETY: these are plain C structs; all-zero is a valid value.
        let mut names: [libc::sockaddr_storage; RECV_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { zeroed() };
        let mut controls = [[0u64; RECV_CMSG_ROOM / 8]; RECV_BATCH];
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { zeroed() };
        for (i, &slot) in slots.iter().enumerate() {
            iovs[i].iov_base = self.bufs[slot].as_mut_ptr() as *mut libc::c_void;
            iovs[i].iov_len = self.bufs[slot].len();
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = RECV_CMSG_ROOM as _;
        }
        // SAFETY: the first `n` headers point at live buffers of the
        // lengths given, all of which outlive the call.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            self.free.extend(slots.iter().rev());
            return Err(err);
        }
        let got = got as usize;
        let mut kept = 0;
        for (i, &slot) in slots.iter().enumerate() {
            if i >= got {
                self.free.push(slot);
                continue;
            }
            let h = &hdrs[i].msg_hdr;
            let Some(addr) = super::udp::sockaddr_to_std(&names[i]) else {
                self.free.push(slot);
                continue;
            };
            if h.msg_flags & libc::MSG_TRUNC != 0 {
                self.free.push(slot);
                continue;
            }
            let (gso, arrived) = read_controls(h);
            self.add(slot, hdrs[i].msg_len as usize, gso, unmap(addr), arrived);
            kept += 1;
        }
        Ok(kept)
    }

    /// Puts `data` in as one received message cut at `seg` (tests).
    #[cfg(test)]
    pub(super) fn push_message(&mut self, data: &[u8], seg: usize, from: SocketAddr) -> bool {
        let Some(slot) = self.free.pop() else {
            return false;
        };
        self.bufs[slot][..data.len()].copy_from_slice(data);
        self.add(slot, data.len(), seg, from, None);
        true
    }
}

/// The GRO segment size and the arrival time a received message's control
/// messages carry.
fn read_controls(h: &libc::msghdr) -> (usize, Option<Duration>) {
    let mut gso = 0usize;
    let mut arrived = None;
    // SAFETY: the kernel filled msg_control/msg_controllen of this header;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within them, and each control
    // message's data is as long as its type says (an int for UDP_GRO, a
    // timespec for SCM_TIMESTAMPNS), read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(h);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                gso =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int) as usize;
            } else if (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                arrived = timespec_to_duration(&ts);
            }
            cmsg = libc::CMSG_NXTHDR(h, cmsg);
        }
    }
    (gso, arrived)
}

/// A kernel timestamp (`CLOCK_REALTIME`) as time since the Unix epoch.
fn timespec_to_duration(ts: &libc::timespec) -> Option<Duration> {
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec)
        .ok()
        .filter(|&n| n < 1_000_000_000)?;
    (secs > 0 || nanos > 0).then(|| Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 7))
    }

    /// A message of datagrams numbered from `first`: `count` of `seg`
    /// bytes and a last one of `tail` bytes (0: none). Each datagram's
    /// bytes start with its number, so the test can tell which it got.
    fn message(first: u8, count: usize, seg: usize, tail: usize) -> Vec<u8> {
        let mut data = Vec::new();
        for i in 0..count {
            data.extend(std::iter::repeat_n(first + i as u8, seg));
        }
        data.extend(std::iter::repeat_n(first + count as u8, tail));
        data
    }

    /// Every datagram handed out: (its first byte, length, seq, early).
    fn drain(batch: &mut RecvBatch) -> Vec<(u8, usize, u64, bool)> {
        let mut out = Vec::new();
        while let Some(d) = batch.next_datagram() {
            let bytes = batch.bytes(&d);
            assert_eq!(d.from, from());
            out.push((bytes[0], bytes.len(), d.seq, d.early));
        }
        out
    }

    #[test]
    fn a_batch_splits_coalesced_messages_at_their_segment_size() {
        let mut batch = RecvBatch::new(false);
        batch.push_message(&message(1, 2, 1000, 500), 1000, from());
        batch.push_message(&message(9, 0, 0, 40), 0, from());
        let got = drain(&mut batch);
        assert_eq!(
            got,
            vec![
                (1, 1000, 0, false),
                (2, 1000, 1, false),
                (3, 500, 2, false),
                (9, 40, 3, false)
            ]
        );
        assert!(batch.is_empty());
    }

    #[test]
    fn short_datagrams_behind_the_first_message_go_first_when_reading_ahead() {
        let mut batch = RecvBatch::new(true);
        // 0..3: bulk; 3..6: bulk with a short tail (5); 6: a ping; 7: bulk.
        batch.push_message(&message(10, 3, 1000, 0), 1000, from());
        batch.push_message(&message(20, 2, 1000, 100), 1000, from());
        batch.push_message(&message(30, 0, 0, 116), 0, from());
        batch.push_message(&message(40, 1, 1000, 0), 0, from());
        let got = drain(&mut batch);
        assert_eq!(
            got,
            vec![
                (22, 100, 5, true),
                (30, 116, 6, true),
                (10, 1000, 0, false),
                (11, 1000, 1, false),
                (12, 1000, 2, false),
                (20, 1000, 3, false),
                (21, 1000, 4, false),
                (40, 1000, 7, false),
            ]
        );
    }

    #[test]
    fn an_early_runs_tail_is_told_from_a_lone_short_datagram() {
        let mut batch = RecvBatch::new(true);
        batch.push_message(&message(10, 1, 1000, 0), 0, from());
        batch.push_message(&message(20, 2, 1000, 100), 1000, from());
        batch.push_message(&message(30, 0, 0, 116), 0, from());
        let tail = batch.next_datagram().unwrap();
        assert_eq!((tail.seq, tail.early, tail.tail), (3, true, true));
        let lone = batch.next_datagram().unwrap();
        assert_eq!((lone.seq, lone.early, lone.tail), (4, true, false));
    }

    #[test]
    fn short_datagrams_never_pass_each_other() {
        let mut batch = RecvBatch::new(true);
        // Only short ones (a stream of ACKs): nothing to pass.
        batch.push_message(&message(10, 3, 80, 0), 80, from());
        batch.push_message(&message(20, 2, 80, 0), 80, from());
        let got = drain(&mut batch);
        assert!(got.iter().all(|g| !g.3), "{got:?}");
        let seqs: Vec<u64> = got.iter().map(|g| g.2).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        // A long run ending in a short tail, then a lone short one: the
        // lone one waits for the tail (the walk reaches it first), and
        // passes nothing else.
        batch.push_message(&message(30, 2, 1000, 100), 1000, from());
        batch.push_message(&message(40, 0, 0, 116), 0, from());
        let got = drain(&mut batch);
        let order: Vec<(u64, bool)> = got.iter().map(|g| (g.2, g.3)).collect();
        assert_eq!(order, vec![(5, false), (6, false), (7, false), (8, false)]);
    }

    #[test]
    fn without_reading_ahead_everything_goes_in_arrival_order() {
        let mut batch = RecvBatch::new(false);
        batch.push_message(&message(10, 3, 1000, 0), 1000, from());
        batch.push_message(&message(30, 0, 0, 116), 0, from());
        let got = drain(&mut batch);
        let seqs: Vec<u64> = got.iter().map(|g| g.2).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3]);
        assert!(got.iter().all(|g| !g.3));
    }

    #[test]
    fn the_first_messages_short_tail_stays_in_order() {
        let mut batch = RecvBatch::new(true);
        batch.push_message(&message(10, 2, 1000, 60), 1000, from());
        let got = drain(&mut batch);
        assert_eq!(
            got,
            vec![
                (10, 1000, 0, false),
                (11, 1000, 1, false),
                (12, 60, 2, false)
            ]
        );
    }

    #[test]
    fn a_short_datagram_goes_early_only_within_the_replay_window() {
        let mut batch = RecvBatch::new(true);
        // 0..960 in 24 messages, then a ping (960) and, after 40 more, a
        // second one (1001): the first is within reach, the second not yet.
        for _ in 0..24 {
            assert!(batch.push_message(&message(1, 40, 1000, 0), 1000, from()));
        }
        assert!(batch.push_message(&message(100, 0, 0, 116), 0, from()));
        assert!(batch.push_message(&message(2, 40, 1000, 0), 1000, from()));
        assert!(batch.push_message(&message(101, 0, 0, 116), 0, from()));
        let first = batch.next_datagram().unwrap();
        assert_eq!((first.seq, first.early), (960, true));
        let next = batch.next_datagram().unwrap();
        assert_eq!((next.seq, next.early), (0, false), "1001 is 1001 ahead");
        // Once the walk is within reach of it, the second goes early.
        for _ in 1..2 {
            batch.next_datagram().unwrap();
        }
        let second = batch.next_datagram().unwrap();
        assert_eq!((second.seq, second.early), (1001, true));
        assert!(second.seq - 2 < EARLY_REACH_DATAGRAMS);
    }

    /// A message for the property test: (datagrams of `seg` bytes, seg,
    /// tail bytes).
    fn any_message() -> impl Strategy<Value = (usize, usize, usize)> {
        (
            0usize..6,
            prop_oneof![Just(0usize), 1usize..300, 1000usize..1500],
            0usize..400,
        )
            .prop_filter("not empty", |&(count, seg, tail)| count * seg + tail > 0)
    }

    proptest! {
        /// Whatever arrives, every datagram is handed out exactly once with
        /// its own bytes; those handed out in order keep arrival order;
        /// only short ones pass, and short ones never pass each other.
        #[test]
        fn every_datagram_is_handed_out_once(
            messages in proptest::collection::vec(any_message(), 1..RECV_BATCH),
            read_ahead: bool,
        ) {
            let mut batch = RecvBatch::new(read_ahead);
            let mut want = Vec::new();
            let mut next = 0u64;
            for (i, &(count, seg, tail)) in messages.iter().enumerate() {
                let (count, seg) = if seg == 0 { (0, 1) } else { (count, seg) };
                // A GRO run's last datagram is shorter than the others.
                let tail = if count > 0 { tail % seg } else { tail };
                if count * seg + tail == 0 {
                    continue;
                }
                let mut data = Vec::new();
                for d in 0..count {
                    data.extend(std::iter::repeat_n((i * 7 + d) as u8, seg));
                    want.push((next, seg));
                    next += 1;
                }
                if tail > 0 {
                    data.extend(std::iter::repeat_n((i * 7 + count) as u8, tail));
                    want.push((next, tail));
                    next += 1;
                }
                // A single datagram arrives with segment size 0.
                let seg_given = if count == 0 || (count == 1 && tail == 0) { 0 } else { seg };
                prop_assert!(batch.push_message(&data, seg_given, from()));
            }
            let mut got = Vec::new();
            let mut last_in_order = None;
            let mut last_short = None;
            while let Some(d) = batch.next_datagram() {
                let len = d.end - d.start;
                if len <= SHORT_DATAGRAM {
                    prop_assert!(last_short.is_none_or(|last| d.seq > last), "short ones in order");
                    last_short = Some(d.seq);
                }
                if d.early {
                    prop_assert!(read_ahead);
                    prop_assert!(len <= SHORT_DATAGRAM);
                } else {
                    prop_assert!(last_in_order.is_none_or(|last| d.seq > last));
                    last_in_order = Some(d.seq);
                }
                got.push((d.seq, len));
            }
            got.sort_unstable();
            prop_assert_eq!(got, want);
            prop_assert!(batch.is_empty());
        }
    }
}
