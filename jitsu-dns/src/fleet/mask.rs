//! Masking: when a boot may be answered, by the VM's masking mode and what has been seen of
//! the boot so far.
//!
//! Owns the precedence of the modes (`wait_for=announce` or `wait_for=tcp:PORT` >
//! `wait_for_key` > `use_synjitsu` > `response_delay`), the fall-back to the delay when
//! synjitsu is unavailable, and the deadlines. It changes nothing: [`super::Fleet`] acts on
//! its answers.
//!
//! `wait_for_key` is Jitsu's: the key is waited for (at most `wait_for_timeout`, 2 s unless
//! set), then the response delay is slept, whether the key came or not. `wait_for=tcp:PORT`
//! answers the moment the guest accepts a connection on PORT (nothing slept after: an open
//! port is the readiness itself), else at `wait_for_timeout`.

use std::time::{Duration, Instant};

use super::vm::{Boot, BootKind};
use crate::config::{VmConfig, WaitFor};

/// How one boot is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mask {
    Announce { timeout: Duration, delay: Duration },
    Tcp { port: u16, timeout: Duration },
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
    } else if let Some(WaitFor::Tcp(port)) = cfg.wait_for {
        Mask::Tcp {
            port,
            timeout: cfg.wait_for_timeout,
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
        Mask::Tcp { .. } if b.port_open => "guest accepted a connection on its port",
        _ if now < give_up => return None,
        Mask::Announce { .. } | Mask::Synjitsu { .. } if b.syn_unavailable => {
            "response delay (synjitsu unavailable)"
        }
        Mask::Announce { .. } => "no announcement in time",
        Mask::Synjitsu { .. } => "synjitsu did not answer in time",
        Mask::Key { .. } => "readiness key did not appear in time",
        Mask::Tcp { .. } => "port did not open in time",
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
        Mask::Tcp { timeout, .. } => timeout,
        Mask::Delay(delay) => delay,
    };
    b.started.map(|started| started + wait)
}

/// The port a fresh boot's guest is probed on, and when the probe may give up: at the
/// timeout counted from the start. `None` for other modes.
pub(super) fn tcp_probe(cfg: &VmConfig, started: Instant) -> Option<(u16, Instant)> {
    match mask_of(cfg) {
        Mask::Tcp { port, timeout } => Some((port, started + timeout)),
        _ => None,
    }
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
    fn masking_precedence_is_wait_for_then_key_then_synjitsu_then_delay() {
        let all = ",wait_for=announce,wait_for_key=/k,use_synjitsu=true,response_delay=0";
        assert!(matches!(mask(all), Mask::Announce { .. }));
        let tcp = ",wait_for=tcp:80,wait_for_key=/k,use_synjitsu=true,wait_for_timeout=3";
        assert_eq!(
            mask(tcp),
            Mask::Tcp {
                port: 80,
                timeout: Duration::from_secs(3)
            }
        );
        assert!(matches!(
            mask(",wait_for_key=/k,use_synjitsu=true"),
            Mask::Key { .. }
        ));
        assert!(matches!(mask(",use_synjitsu=true"), Mask::Synjitsu { .. }));
        assert_eq!(mask(""), Mask::Delay(Duration::from_millis(100)));
    }
}
