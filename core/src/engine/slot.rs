//! Peer slots: where a peer lives in the engine's table, with a generation
//! that tells a reused slot's new peer from the old one.

use slab::Slab;

/// Where a peer lives in the engine's peer table, and which peer it is.
///
/// A slot is reused after its peer leaves; the generation tells the new peer
/// from the old one, so an entry that outlived its peer (a timer) is
/// recognised as stale instead of acting on a stranger. Ordered by position
/// first, so tables keyed by slot iterate in a stable order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PeerSlot {
    index: usize,
    generation: u64,
}

/// A slab whose slots carry generations: every value gets a [`PeerSlot`]
/// never handed out before.
pub(super) struct SlotTable<T> {
    slab: Slab<(u64, T)>,
    next_generation: u64,
}

impl<T> Default for SlotTable<T> {
    fn default() -> Self {
        Self {
            slab: Slab::new(),
            next_generation: 0,
        }
    }
}

impl<T> SlotTable<T> {
    /// Stores a new value in a free slot, under a generation never used before.
    pub(super) fn insert(&mut self, peer: T) -> PeerSlot {
        self.next_generation += 1;
        let generation = self.next_generation;
        let index = self.slab.insert((generation, peer));
        PeerSlot { index, generation }
    }

    /// Removes the value in `slot`; `None` if the slot holds another (or none).
    pub(super) fn remove(&mut self, slot: PeerSlot) -> Option<T> {
        self.get(slot)?;
        Some(self.slab.remove(slot.index).1)
    }

    /// The value in `slot`, if it is still the one the slot was handed out for.
    pub(super) fn get(&self, slot: PeerSlot) -> Option<&T> {
        match self.slab.get(slot.index) {
            Some((generation, peer)) if *generation == slot.generation => Some(peer),
            Some(_) | None => None,
        }
    }

    /// The value in `slot`, mutably, if it is still the one the slot was
    /// handed out for.
    pub(super) fn get_mut(&mut self, slot: PeerSlot) -> Option<&mut T> {
        match self.slab.get_mut(slot.index) {
            Some((generation, peer)) if *generation == slot.generation => Some(peer),
            Some(_) | None => None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    pub(super) fn reserve_exact(&mut self, additional: usize) {
        self.slab.reserve_exact(additional);
    }
}

/// Indexing is for slots the engine holds in its own maps, which it removes
/// together with the peer: those always name the current peer.
impl<T> std::ops::Index<PeerSlot> for SlotTable<T> {
    type Output = T;

    fn index(&self, slot: PeerSlot) -> &T {
        &self.slab[slot.index].1
    }
}

impl<T> std::ops::IndexMut<PeerSlot> for SlotTable<T> {
    fn index_mut(&mut self, slot: PeerSlot) -> &mut T {
        &mut self.slab[slot.index].1
    }
}
