//! What libvirt's domain states and lifecycle events mean to the fleet ([`Observed`]), as
//! pure functions of libvirt's numbers.
//!
//! Reading the states and receiving the events is the session's and the backend's.

use virt::sys;

use crate::fleet::Observed;

/// What libvirt's domain state means to the fleet. `paused_reason` is the reason of a paused
/// domain, `saved` whether a shut-off one has a managed save.
pub(super) fn observed_of(
    state: u32,
    paused_reason: Option<u32>,
    id: Option<u32>,
    saved: bool,
) -> Observed {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED | sys::VIR_DOMAIN_SHUTDOWN => {
            Observed::Running { domid: id }
        }
        sys::VIR_DOMAIN_PAUSED => match paused_reason {
            // Paused on its way into a managed save: saved, as far as anyone should act.
            Some(sys::VIR_DOMAIN_PAUSED_SAVE) => Observed::Suspended,
            // Paused only while QEMU starts it.
            Some(sys::VIR_DOMAIN_PAUSED_STARTING_UP) => Observed::Running { domid: id },
            _ => Observed::Paused,
        },
        sys::VIR_DOMAIN_PMSUSPENDED => Observed::Paused,
        sys::VIR_DOMAIN_SHUTOFF if saved => Observed::Suspended,
        // Xen's "no state" is a domain that runs but is not scheduled right now.
        sys::VIR_DOMAIN_NOSTATE if id.is_some() => Observed::Running { domid: id },
        // Shut off, crashed (nothing runs; destroying it is the clean-up), unknown.
        _ => Observed::Off,
    }
}

/// What a lifecycle event says the domain now is; `None` for events that change nothing
/// (defined, undefined, a guest-initiated shutdown that has not stopped it yet).
pub(super) fn observed_from_event(event: i32, detail: i32, id: Option<u32>) -> Option<Observed> {
    let (event, detail) = (u32::try_from(event).ok()?, u32::try_from(detail).ok()?);
    match event {
        sys::VIR_DOMAIN_EVENT_STARTED | sys::VIR_DOMAIN_EVENT_RESUMED => {
            Some(Observed::Running { domid: id })
        }
        sys::VIR_DOMAIN_EVENT_SUSPENDED | sys::VIR_DOMAIN_EVENT_PMSUSPENDED => {
            Some(Observed::Paused)
        }
        sys::VIR_DOMAIN_EVENT_STOPPED if detail == sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => {
            Some(Observed::Suspended)
        }
        sys::VIR_DOMAIN_EVENT_STOPPED | sys::VIR_DOMAIN_EVENT_CRASHED => Some(Observed::Off),
        _ => None,
    }
}

/// The event's name and detail for logs.
pub(super) fn event_words(event: i32, detail: i32) -> (&'static str, i32) {
    let name = match u32::try_from(event).unwrap_or(u32::MAX) {
        sys::VIR_DOMAIN_EVENT_DEFINED => "defined",
        sys::VIR_DOMAIN_EVENT_UNDEFINED => "undefined",
        sys::VIR_DOMAIN_EVENT_STARTED => "started",
        sys::VIR_DOMAIN_EVENT_SUSPENDED => "suspended",
        sys::VIR_DOMAIN_EVENT_RESUMED => "resumed",
        sys::VIR_DOMAIN_EVENT_STOPPED => "stopped",
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => "shutdown",
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => "pmsuspended",
        sys::VIR_DOMAIN_EVENT_CRASHED => "crashed",
        _ => "unknown",
    };
    (name, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_states_map_to_the_fleets() {
        let run = Observed::Running { domid: Some(4) };
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_RUNNING, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_BLOCKED, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTDOWN, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_USER),
                Some(4),
                false
            ),
            Observed::Paused
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_SAVE),
                Some(4),
                false
            ),
            Observed::Suspended
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_STARTING_UP),
                Some(4),
                false
            ),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_PMSUSPENDED, None, Some(4), false),
            Observed::Paused
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTOFF, None, None, true),
            Observed::Suspended
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTOFF, None, None, false),
            Observed::Off
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_CRASHED, None, Some(4), false),
            Observed::Off
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_NOSTATE, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_NOSTATE, None, None, false),
            Observed::Off
        );
    }

    #[test]
    fn lifecycle_events_map_to_the_fleets_states() {
        let ev = |e: u32, d: u32| observed_from_event(e as i32, d as i32, Some(9));
        let run = Some(Observed::Running { domid: Some(9) });
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_BOOTED
            ),
            run
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_RESTORED
            ),
            run
        );
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_RESUMED, 0), run);
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_SUSPENDED, 0),
            Some(Observed::Paused)
        );
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_PMSUSPENDED, 0),
            Some(Observed::Paused)
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_SAVED
            ),
            Some(Observed::Suspended)
        );
        for detail in [
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED,
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED,
        ] {
            assert_eq!(
                ev(sys::VIR_DOMAIN_EVENT_STOPPED, detail),
                Some(Observed::Off)
            );
        }
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_CRASHED, 0), Some(Observed::Off));
        // The guest asked to power off: it stops a moment later, with its own event.
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_SHUTDOWN, 0), None);
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_DEFINED, 0), None);
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_UNDEFINED, 0), None);
        assert_eq!(observed_from_event(-1, 0, None), None);
        assert_eq!(observed_from_event(999, 0, None), None);
    }
}
