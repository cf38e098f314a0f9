// SPDX-License-Identifier: GPL-3.0-only
//! The kernel's clock: the TSC, counted from the kernel's first instruction, at a rate
//! measured against a clock whose rate is known.
//!
//! Under TCG the guest's TSC is the host's (plus an offset), so its rate is the host's, which
//! the guest is not told: no CPUID leaf 0x15/0x16 and no kvmclock without KVM. QEMU does
//! promise one rate: its local APIC timer counts at 1 GHz of the virtual clock (the host's
//! monotonic clock under TCG). The kernel starts that timer at once, lets virtio set-up run,
//! and divides the TSC ticks by the APIC nanoseconds that passed: no time spent waiting.
//!
//! Each APIC reading is bracketed by two TSC readings, and the narrowest of a few brackets
//! is kept: the host may deschedule the virtual CPU for milliseconds at any instruction, and
//! a pause between the two clocks' readings would skew the rate by as much; a pause anywhere
//! else does not matter, since both clocks run on the host's time.

use smoltcp::time::Instant;

/// One reading of the reference clock (nanoseconds) between two TSC readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The TSC just before.
    pub tsc_before: u64,
    /// The reference clock, in nanoseconds.
    pub ns: u64,
    /// The TSC just after.
    pub tsc_after: u64,
}

impl Sample {
    fn width(&self) -> u64 {
        self.tsc_after.saturating_sub(self.tsc_before)
    }

    fn tsc_mid(&self) -> u64 {
        self.tsc_before + self.width() / 2
    }

    /// The sample taken with the least time between its TSC readings.
    pub fn narrowest(samples: impl IntoIterator<Item = Sample>) -> Option<Sample> {
        samples.into_iter().min_by_key(Sample::width)
    }
}

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

    /// The TSC's rate between two samples, or `None` if either clock stood still.
    pub fn rate(start: Sample, end: Sample) -> Option<u64> {
        let ns = end.ns.checked_sub(start.ns).filter(|ns| *ns > 0)?;
        let ticks = end
            .tsc_mid()
            .checked_sub(start.tsc_mid())
            .filter(|t| *t > 0)?;
        u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(ns)).ok()
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

    fn sample(tsc_before: u64, ns: u64, tsc_after: u64) -> Sample {
        Sample {
            tsc_before,
            ns,
            tsc_after,
        }
    }

    #[test]
    fn the_rate_is_tsc_ticks_per_reference_second_between_bracket_middles() {
        // 2.1 GHz: 4.2 million ticks in 2 ms.
        let start = sample(1000, 500, 1200);
        let end = sample(4_201_000, 2_000_500, 4_201_200);
        assert_eq!(TscClock::rate(start, end), Some(2_100_000_000));
        assert_eq!(TscClock::rate(start, start), None);
        assert_eq!(TscClock::rate(end, start), None);
    }

    #[test]
    fn a_sample_the_host_paused_in_is_not_the_one_kept() {
        // The first reading waited 3 ms for a host CPU between the TSC and the APIC.
        let paused = sample(0, 3_000_000, 6_300_000);
        let quick = sample(6_300_100, 3_000_050, 6_300_300);
        assert_eq!(Sample::narrowest([paused, quick]), Some(quick));
        assert_eq!(Sample::narrowest([]), None);
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
