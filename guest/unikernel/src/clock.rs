// SPDX-License-Identifier: GPL-3.0-only
//! The kernel's clock: the TSC, counted from the kernel's first instruction, at a rate
//! measured against a clock whose rate is known.
//!
//! Under TCG the guest's TSC is the host's (plus an offset), so its rate is the host's, which
//! the guest is not told: no CPUID leaf 0x15/0x16 and no kvmclock without KVM. QEMU does
//! promise one rate: its local APIC timer counts at 1 GHz of the virtual clock (the host's
//! monotonic clock under TCG). The kernel starts that timer at once, lets virtio set-up run,
//! and divides the TSC ticks by the APIC nanoseconds that passed: no time spent waiting, and
//! the error of reading each clock once (well under a microsecond) is small against the
//! milliseconds between the two readings.

use smoltcp::time::Instant;

/// Converts TSC readings to time since the kernel's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscClock {
    entry: u64,
    hz: u64,
}

/// The shortest calibration interval that gives the rate to 0.1% when each reading can be a
/// microsecond late.
pub const MIN_CALIBRATION_NS: u64 = 1_000_000;

impl TscClock {
    /// A clock counting from `entry` at `hz` TSC ticks per second.
    pub fn new(entry: u64, hz: u64) -> TscClock {
        TscClock {
            entry,
            hz: hz.max(1),
        }
    }

    /// The TSC's rate from two readings `ns` nanoseconds apart, or `None` if no time passed.
    pub fn rate(tsc_before: u64, tsc_after: u64, ns: u64) -> Option<u64> {
        if ns == 0 || tsc_after <= tsc_before {
            return None;
        }
        let hz = u128::from(tsc_after - tsc_before) * 1_000_000_000 / u128::from(ns);
        u64::try_from(hz).ok()
    }

    /// Ticks per second.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// Microseconds in `ticks` TSC ticks.
    pub fn micros(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.hz)) as u64
    }

    /// Microseconds from the entry point to the TSC reading `tsc`.
    pub fn micros_since_entry(&self, tsc: u64) -> u64 {
        self.micros(tsc.saturating_sub(self.entry))
    }

    /// The reading `tsc` as smoltcp's time (counted from the entry point).
    pub fn instant(&self, tsc: u64) -> Instant {
        Instant::from_micros(self.micros_since_entry(tsc) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_tsc_ticks_per_apic_second() {
        // 2.1 GHz: 4.2 million ticks in 2 ms.
        assert_eq!(
            TscClock::rate(1000, 4_201_000, 2_000_000),
            Some(2_100_000_000)
        );
        assert_eq!(TscClock::rate(1000, 1000, 2_000_000), None);
        assert_eq!(TscClock::rate(1000, 2000, 0), None);
    }

    #[test]
    fn time_counts_from_the_entry_point() {
        let c = TscClock::new(5_000, 2_000_000_000);
        assert_eq!(c.micros_since_entry(5_000 + 24_000_000), 12_000);
        assert_eq!(c.instant(5_000 + 24_000_000), Instant::from_millis(12));
        // A reading from before the entry point (another CPU's TSC, a bug) is time zero.
        assert_eq!(c.micros_since_entry(10), 0);
    }

    #[test]
    fn a_day_of_ticks_does_not_overflow() {
        let c = TscClock::new(0, 3_000_000_000);
        assert_eq!(c.micros_since_entry(3_000_000_000 * 86_400), 86_400_000_000);
    }
}
