//! The order in which the daemon's loop serves its sources (the packet socket, the
//! announcement watcher, control
//! requests, Xenstore and forwarding-table results, metrics requests, housekeeping): each
//! turn tries them starting after the one served last, so a source that is always ready (the
//! packet socket under a flood) gets one turn per round like every other, and any source that
//! is ready is served within one round. Pure: it knows no source, only their positions.

/// A round robin over `N` sources.
#[derive(Debug, Clone, Copy, Default)]
pub struct Turns<const N: usize> {
    next: usize,
}

impl<const N: usize> Turns<N> {
    /// The sources' positions in the order to try them this turn.
    pub fn order(&self) -> impl Iterator<Item = usize> + use<N> {
        let next = self.next;
        (0..N).map(move |i| (next + i) % N)
    }

    /// Source `i` was served: the next turn starts after it.
    pub fn served(&mut self, i: usize) {
        self.next = (i + 1) % N;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `rounds` turns of sources whose readiness `ready` gives; returns who was served.
    fn serve<const N: usize>(ready: impl Fn(usize) -> bool, rounds: usize) -> Vec<usize> {
        let mut t = Turns::<N>::default();
        let mut served = Vec::new();
        for _ in 0..rounds {
            if let Some(i) = t.order().find(|&i| ready(i)) {
                t.served(i);
                served.push(i);
            }
        }
        served
    }

    #[test]
    fn every_ready_source_is_served_in_one_round() {
        assert_eq!(serve::<4>(|_| true, 8), [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn a_source_that_is_always_ready_does_not_starve_another() {
        // The socket (0) under a flood, and control (3) with a request each turn.
        assert_eq!(serve::<6>(|i| i == 0 || i == 3, 6), [0, 3, 0, 3, 0, 3]);
        // The socket alone is served every turn.
        assert_eq!(serve::<6>(|i| i == 0, 3), [0, 0, 0]);
    }
}
