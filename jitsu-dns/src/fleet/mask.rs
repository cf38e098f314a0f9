//! Masking: when a boot may be answered, by the VM's masking mode and what has been seen of
//! the boot so far.
//!
//! Owns the precedence of the modes (`wait_for=announce` > `wait_for_key` > `use_synjitsu` >
//! `response_delay`), the fall-back to the delay when synjitsu is unavailable, and the
//! deadlines. It changes nothing: [`super::Fleet`] acts on its answers.
//!
//! `wait_for_key` is Jitsu's: the key is waited for (at most `wait_for_timeout`, 2 s unless
//! set), then the response delay is slept, whether the key came or not.

use std::time::{Duration, Instant};

use super::vm::{Boot, BootKind};
use crate::config::{VmConfig, WaitFor};

/// How one boot is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mask {
    Announce { timeout: Duration, delay: Duration },
    Key { timeout: Duration, delay: Duration },
    Synjitsu { timeout: Duration, delay: Duration },
    Delay(Duration),
}

pub(super) fn mask_of(cfg: &VmConfig) -> Mask {
    if cfg.wait_for == Some(WaitFor::Announce) {
        Mask::Announce {
            timeout: cfg.wait_for_timeout,
            delay: cfg.response_delay,
        }
    } else if cfg.wait_for_key.is_some() {
        Mask::Key {
            timeout: cfg.wait_for_timeout,
            delay: cfg.response_delay,
        }
    } else if cfg.use_synjitsu {
        Mask::Synjitsu {
            timeout: cfg.wait_for_timeout,
            delay: cfg.response_delay,
        }
    } else {
        Mask::Delay(cfg.response_delay)
    }
}

/// Why a boot may be answered now, or `None`.
pub(super) fn answer_reason(cfg: &VmConfig, b: &Boot, now: Instant) -> Option<&'static str> {
    if b.kind != BootKind::Fresh {
        return b.started.map(|_| match b.kind {
            BootKind::Resume => "resumed",
            _ => "unpaused",
        });
    }
    let mask = mask_of(cfg);
    // synjitsu's acknowledgement is the one condition met before the backend started the VM.
    if matches!(mask, Mask::Synjitsu { .. }) && b.acked {
        return Some("synjitsu holds its SYNs");
    }
    if let (Mask::Key { delay, .. }, Some(seen)) = (mask, b.key_seen) {
        return (now >= seen + delay).then_some("readiness key appeared");
    }
    let give_up = give_up_at(mask, b)?;
    Some(match mask {
        Mask::Announce { .. } if b.announced => "guest announced itself",
        _ if now < give_up => return None,
        Mask::Announce { .. } | Mask::Synjitsu { .. } if b.syn_unavailable => {
            "response delay (synjitsu unavailable)"
        }
        Mask::Announce { .. } => "no announcement in time",
        Mask::Synjitsu { .. } => "synjitsu did not answer in time",
        Mask::Key { .. } => "readiness key did not appear in time",
        Mask::Delay(_) => "response delay",
    })
}

/// When a fresh boot is answered although its masking condition was not met: at the
/// response delay if synjitsu is unavailable to a synjitsu-based mode, at the timeout and
/// then the response delay for a key (as Jitsu), else at the timeout, counted from the
/// start. `None` until the backend started the VM.
fn give_up_at(mask: Mask, b: &Boot) -> Option<Instant> {
    let wait = match mask {
        Mask::Announce { timeout, delay } | Mask::Synjitsu { timeout, delay } => {
            if b.syn_unavailable { delay } else { timeout }
        }
        Mask::Key { timeout, delay } => timeout + delay,
        Mask::Delay(delay) => delay,
    };
    b.started.map(|started| started + wait)
}

/// When the timer must look at a fresh boot again: the time it is answered without its
/// masking condition. `None` for a resume or unpause, which the backend's result settles.
pub(super) fn boot_deadline(cfg: &VmConfig, b: &Boot) -> Option<Instant> {
    if b.kind != BootKind::Fresh {
        return None;
    }
    let mask = mask_of(cfg);
    if let (Mask::Key { delay, .. }, Some(seen)) = (mask, b.key_seen) {
        return Some(seen + delay);
    }
    give_up_at(mask, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, merge};

    fn mask(extra: &str) -> Mask {
        let f = Flags {
            specs: vec![format!(
                "name=a,dns=a.example.org,ip=10.0.0.1,command=x{extra}"
            )],
            ..Flags::default()
        };
        mask_of(&merge(&f, None).unwrap().vms[0])
    }

    #[test]
    fn masking_precedence_is_announce_then_key_then_synjitsu_then_delay() {
        let all = ",wait_for=announce,wait_for_key=/k,use_synjitsu=true,response_delay=0";
        assert!(matches!(mask(all), Mask::Announce { .. }));
        assert!(matches!(
            mask(",wait_for_key=/k,use_synjitsu=true"),
            Mask::Key { .. }
        ));
        assert!(matches!(mask(",use_synjitsu=true"), Mask::Synjitsu { .. }));
        assert_eq!(mask(""), Mask::Delay(Duration::from_millis(100)));
    }
}
