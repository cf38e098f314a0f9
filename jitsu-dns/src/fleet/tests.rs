//! The fleet's rules, each driven through [`Fleet::handle`] with synthetic `Instant`s.

use shared_proto::{ClientMessage, Handover, Mac, Phase};

use super::*;
use crate::config::{Flags, StopMode, merge};

const TTL: Duration = Duration::from_secs(1);

fn settings() -> Settings {
    Settings {
        ttl: TTL,
        max_running: None,
        max_boots_per_second: None,
        flush_every: COUNTERS_FLUSH_EVERY,
    }
}

fn vms_with(backend: &str, specs: &[&str]) -> Vec<Arc<VmConfig>> {
    let f = Flags {
        backend: Some(backend.into()),
        specs: specs.iter().map(|s| s.to_string()).collect(),
        ..Flags::default()
    };
    merge(&f, None)
        .unwrap()
        .vms
        .into_iter()
        .map(Arc::new)
        .collect()
}

fn vms(specs: &[&str]) -> Vec<Arc<VmConfig>> {
    vms_with("process", specs)
}

fn spec(name: &str, n: u8, extra: &str) -> String {
    format!("name={name},dns={name}.example.org,ip=10.0.0.{n},command=x{extra}")
}

/// A fleet at `t0` with VMs reconciled as off.
fn fleet(specs: &[String], s: Settings) -> (Fleet, Instant) {
    let t0 = Instant::now();
    let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let cfgs = vms(&refs);
    let mut f = Fleet::new(t0, s, cfgs.clone());
    for c in cfgs {
        let out = f.handle(
            t0,
            Event::Reconciled {
                vm: c.name.clone(),
                stored: None,
                observed: Observed::Off,
            },
        );
        assert!(
            out.is_empty(),
            "a new VM that is off needs nothing: {out:?}"
        );
    }
    (f, t0)
}

fn name(n: &str) -> VmName {
    Arc::from(n)
}

fn query(f: &mut Fleet, t: Instant, vm: &str, id: u64) -> Vec<Command> {
    f.handle(
        t,
        Event::Query {
            id: QueryId(id),
            vm: name(vm),
            from: Some("10.0.0.99".parse().unwrap()),
        },
    )
}

fn started(f: &mut Fleet, t: Instant, vm: &str, domid: Option<u32>) -> Vec<Command> {
    f.handle(
        t,
        Event::Started {
            vm: name(vm),
            domid,
            port: None,
        },
    )
}

fn tick(f: &mut Fleet, t: Instant) -> Vec<Command> {
    f.handle(t, Event::Tick { activity: vec![] })
}

fn answers(out: &[Command]) -> Vec<(u64, Answer)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Answer { id, answer } => Some((id.0, *answer)),
            _ => None,
        })
        .collect()
}

fn starts(out: &[Command]) -> usize {
    out.iter()
        .filter(|c| matches!(c, Command::Start { .. }))
        .count()
}

/// synjitsu acknowledges the `Booting` in `out`: what follows (the backend's start).
fn ack_booting(f: &mut Fleet, t: Instant, out: &[Command]) -> Vec<Command> {
    let sent = synjitsu(out);
    let Some((tag, _)) = sent
        .iter()
        .find(|(_, m)| matches!(m, ClientMessage::Booting { .. }))
    else {
        panic!("no booting in {out:?}")
    };
    f.handle(
        t,
        Event::SynjitsuReplied {
            tag: *tag,
            ok: true,
        },
    )
}

fn stops(out: &[Command]) -> Vec<StopMode> {
    out.iter()
        .filter_map(|c| match c {
            Command::Stop { mode, .. } => Some(*mode),
            _ => None,
        })
        .collect()
}

fn synjitsu(out: &[Command]) -> Vec<(u64, ClientMessage)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Synjitsu { tag, msg } => Some((*tag, msg.clone())),
            _ => None,
        })
        .collect()
}

fn lifecycle(out: &[Command]) -> Vec<(Lifecycle, Lifecycle, String)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Persist(Persist::Lifecycle {
                from, to, cause, ..
            }) => Some((*from, *to, cause.clone())),
            _ => None,
        })
        .collect()
}

fn serve(out: &[Command]) -> Option<bool> {
    out.iter().rev().find_map(|c| match c {
        Command::Serve { direct, .. } => Some(*direct),
        _ => None,
    })
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn one_boot_however_many_queries_and_all_answered_at_the_delay() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0.1")], settings());
    let mut all = Vec::new();
    for i in 0..50 {
        all.extend(query(&mut f, t0 + MS * i, "www", i as u64));
    }
    assert_eq!(starts(&all), 1, "one boot for 50 queries");
    assert!(
        answers(&all).is_empty(),
        "nothing answered before the VM started"
    );
    assert_eq!(
        lifecycle(&all),
        vec![(
            Lifecycle::Off,
            Lifecycle::Booting,
            "query from 10.0.0.99".into()
        )]
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Booting));
    assert_eq!(f.view("www").unwrap().starts, 1);
    assert_eq!(f.view("www").unwrap().requests, 50);

    let t_started = t0 + MS * 60;
    let out = started(&mut f, t_started, "www", None);
    assert!(answers(&out).is_empty(), "the delay has not passed");
    assert_eq!(f.poll_at(), Some(t_started + MS * 100));
    assert!(answers(&tick(&mut f, t_started + MS * 99)).is_empty());
    let out = tick(&mut f, t_started + MS * 100);
    let a = answers(&out);
    assert_eq!(a.len(), 50);
    assert!(a.iter().all(|(_, ans)| *ans == Answer::Ready));
    let ids: std::collections::BTreeSet<u64> = a.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, (0..50).collect());
    assert_eq!(serve(&out), Some(true));
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    let boot = out
        .iter()
        .find_map(|c| match c {
            Command::Persist(Persist::Lifecycle { boot_took, .. }) => *boot_took,
            _ => None,
        })
        .unwrap();
    assert_eq!(boot, MS * 160);

    // Later queries are answered at once and boot nothing.
    let out = query(&mut f, t_started + MS * 200, "www", 99);
    assert_eq!(answers(&out), vec![(99, Answer::Ready)]);
    assert_eq!(starts(&out), 0);
}

#[test]
fn zero_delay_answers_when_the_backend_reports_started() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0")], settings());
    let out = query(&mut f, t0, "www", 1);
    assert!(answers(&out).is_empty());
    let out = started(&mut f, t0 + MS, "www", None);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
}

#[test]
fn wait_for_key_answers_when_the_key_appears_or_at_the_timeout() {
    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",wait_for_key=/jitsu/www/ready,wait_for_timeout=5,response_delay=0",
        )],
        settings(),
    );
    let out = query(&mut f, t0, "www", 1);
    assert!(out.contains(&Command::WatchKey {
        vm: name("www"),
        path: "/jitsu/www/ready".into()
    }));
    let out = started(&mut f, t0 + MS, "www", None);
    assert!(
        answers(&out).is_empty(),
        "the delay does not apply: the key does"
    );
    assert!(answers(&tick(&mut f, t0 + MS * 500)).is_empty());
    let out = f.handle(t0 + MS * 700, Event::KeyAppeared { vm: name("www") });
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert!(out.contains(&Command::UnwatchKey { vm: name("www") }));
    assert_eq!(lifecycle(&out)[0].2, "readiness key appeared");

    // A key that never comes: answered at the timeout anyway, after the response delay
    // (here -d's 0.1 s), as Jitsu slept it after its wait.
    let (mut f, t0) = fleet(
        &[spec(
            "b",
            2,
            ",wait_for_key=/jitsu/b/ready,wait_for_timeout=5",
        )],
        settings(),
    );
    query(&mut f, t0, "b", 2);
    started(&mut f, t0 + MS, "b", None);
    let at = t0 + MS + Duration::from_secs(5) + MS * 100;
    assert_eq!(f.poll_at(), Some(at));
    assert!(answers(&tick(&mut f, at - MS)).is_empty());
    let out = tick(&mut f, at);
    assert_eq!(answers(&out), vec![(2, Answer::Ready)]);
    assert_eq!(lifecycle(&out)[0].2, "readiness key did not appear in time");
}

#[test]
fn wait_for_tcp_probes_once_started_and_answers_when_the_port_opens_or_at_the_timeout() {
    let (mut f, t0) = fleet(
        &[
            spec("www", 1, ",wait_for=tcp:8080,wait_for_timeout=5"),
            spec("b", 2, ",wait_for=tcp:80,wait_for_timeout=2"),
        ],
        settings(),
    );
    let out = query(&mut f, t0, "www", 1);
    assert!(
        !out.iter().any(|c| matches!(c, Command::ProbeTcp { .. })),
        "nothing to probe before the backend started it: {out:?}"
    );
    let out = started(&mut f, t0 + MS, "www", None);
    assert!(out.contains(&Command::ProbeTcp {
        vm: name("www"),
        addr: "10.0.0.1:8080".parse().unwrap(),
        until: t0 + MS + Duration::from_secs(5),
    }));
    assert!(
        answers(&out).is_empty(),
        "neither -d's delay nor the start answers: the port does"
    );
    assert!(answers(&tick(&mut f, t0 + MS * 900)).is_empty());
    let out = f.handle(t0 + MS * 900, Event::PortOpened { vm: name("www") });
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert!(out.contains(&Command::StopProbe { vm: name("www") }));
    assert_eq!(
        lifecycle(&out)[0].2,
        "guest accepted a connection on its port"
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    // A port that never opens: answered at the timeout, with nothing slept after it.
    query(&mut f, t0, "b", 2);
    started(&mut f, t0 + MS, "b", None);
    let at = t0 + MS + Duration::from_secs(2);
    assert!(f.poll_at().is_some_and(|p| p <= at));
    assert!(answers(&tick(&mut f, at - MS)).is_empty());
    let out = tick(&mut f, at);
    assert_eq!(answers(&out), vec![(2, Answer::Ready)]);
    assert!(out.contains(&Command::StopProbe { vm: name("b") }));
    assert_eq!(lifecycle(&out)[0].2, "port did not open in time");
    // A late report of the port changes nothing.
    let out = f.handle(at + MS, Event::PortOpened { vm: name("b") });
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_failed_boot_stops_its_probe() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",wait_for=tcp:80")], settings());
    query(&mut f, t0, "www", 1);
    started(&mut f, t0 + MS, "www", None);
    let out = f.handle(
        t0 + MS * 2,
        Event::Observed {
            vm: name("www"),
            state: Observed::Off,
            epoch: None,
        },
    );
    assert!(out.contains(&Command::StopProbe { vm: name("www") }));
    assert_eq!(
        answers(&out),
        vec![(1, Answer::ServFail(Refusal::BootFailed))]
    );
}

#[test]
fn wait_for_key_waits_two_seconds_then_the_response_delay_as_jitsu() {
    let (mut f, t0) = fleet(
        &[
            spec("a", 1, ",wait_for_key=/jitsu/a/ready,response_delay=0.5"),
            spec("b", 2, ",wait_for_key=/jitsu/b/ready"),
            spec("c", 3, ",wait_for=announce"),
        ],
        settings(),
    );
    let cfg = |n: &str| f.view(n).unwrap().cfg.clone();
    assert_eq!(cfg("a").wait_for_timeout, Duration::from_secs(2));
    assert_eq!(
        cfg("c").wait_for_timeout,
        Duration::from_secs(10),
        "not a key"
    );
    // The key appears: answered once the response delay has passed after it.
    query(&mut f, t0, "a", 1);
    started(&mut f, t0 + MS, "a", None);
    let seen = t0 + MS * 300;
    let out = f.handle(seen, Event::KeyAppeared { vm: name("a") });
    assert!(answers(&out).is_empty(), "{out:?}");
    assert_eq!(f.poll_at(), Some(seen + MS * 500));
    assert!(answers(&tick(&mut f, seen + MS * 499)).is_empty());
    let out = tick(&mut f, seen + MS * 500);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert_eq!(lifecycle(&out)[0].2, "readiness key appeared");
    // It never appears: 2 s, then -d's 0.1 s.
    query(&mut f, t0, "b", 2);
    started(&mut f, t0 + MS, "b", None);
    let at = t0 + MS + Duration::from_millis(2100);
    assert!(answers(&tick(&mut f, at - MS)).is_empty());
    let out = tick(&mut f, at);
    assert_eq!(answers(&out), vec![(2, Answer::Ready)]);
    assert_eq!(lifecycle(&out)[0].2, "readiness key did not appear in time");
}

#[test]
fn relative_keys_are_watched_under_the_domain_once_its_id_is_known() {
    let cfgs = vms_with(
        "libvirt",
        &["name=m,dns=m.example.org,ip=10.0.0.1,wait_for_key=data/ready,kernel=/k"],
    );
    let t0 = Instant::now();
    let mut f = Fleet::new(t0, settings(), cfgs);
    f.handle(
        t0,
        Event::Reconciled {
            vm: name("m"),
            stored: None,
            observed: Observed::Off,
        },
    );
    let out = query(&mut f, t0, "m", 1);
    assert!(!out.iter().any(|c| matches!(c, Command::WatchKey { .. })));
    let out = started(&mut f, t0 + MS, "m", Some(7));
    assert!(out.contains(&Command::WatchKey {
        vm: name("m"),
        path: "/local/domain/7/data/ready".into()
    }));
    // Answered -d's 0.1 s after the key.
    let out = f.handle(t0 + MS * 2, Event::KeyAppeared { vm: name("m") });
    assert!(answers(&out).is_empty(), "{out:?}");
    let out = tick(&mut f, t0 + MS * 102);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert_eq!(f.view("m").unwrap().domid, Some(7));
}

#[test]
fn use_synjitsu_answers_on_the_ack_even_before_the_vm_started() {
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,response_delay=5")],
        settings(),
    );
    let out = f.handle(t0, Event::SynjitsuUp);
    let sync = synjitsu(&out);
    assert_eq!(sync.len(), 1);
    let ClientMessage::Sync { vms } = &sync[0].1 else {
        panic!("{sync:?}")
    };
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].phase, Phase::Stopped);

    let out = query(&mut f, t0, "www", 1);
    let sent = synjitsu(&out);
    assert_eq!(sent.len(), 1);
    let (tag, ClientMessage::Booting { vm }) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(vm.name, "www");
    assert_eq!(vm.ipv4.to_string(), "10.0.0.1");
    assert_eq!(vm.handover, Handover::Wire);
    assert_eq!(starts(&out), 0, "synjitsu stands in before the VM starts");
    assert!(answers(&out).is_empty());

    let out = f.handle(
        t0 + MS * 3,
        Event::SynjitsuReplied {
            tag: *tag,
            ok: true,
        },
    );
    assert_eq!(starts(&out), 1);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert_eq!(
        f.state("www"),
        Some(Lifecycle::Booting),
        "running only once started"
    );
    // More queries during the boot are answered at once.
    assert_eq!(
        answers(&query(&mut f, t0 + MS * 4, "www", 2)),
        vec![(2, Answer::Ready)]
    );
    let out = started(&mut f, t0 + MS * 50, "www", None);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    assert_eq!(lifecycle(&out)[0].2, "synjitsu holds its SYNs");
}

#[test]
fn a_boot_synjitsu_takes_from_the_wire_starts_once_synjitsu_stands_in_or_cannot() {
    // A guest up within ms of its start (a woken standby QEMU) announces itself once: to a
    // synjitsu that does not know it yet, it is lost, and synjitsu stands in for a guest
    // that is up. So the backend's start waits for the acknowledgement of `Booting`.
    let www = [spec("www", 1, ",use_synjitsu=true,response_delay=5")];
    let booting = |f: &mut Fleet, t: Instant| {
        let out = query(f, t, "www", 1);
        assert_eq!(
            starts(&out),
            0,
            "started before synjitsu stands in: {out:?}"
        );
        let sent = synjitsu(&out);
        assert!(
            matches!(sent[..], [(_, ClientMessage::Booting { .. })]),
            "{sent:?}"
        );
        sent[0].0
    };
    // Acknowledged: started then, once.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(t0, Event::SynjitsuUp);
    let tag = booting(&mut f, t0);
    let out = f.handle(t0 + MS, Event::SynjitsuReplied { tag, ok: true });
    assert_eq!(starts(&out), 1);
    assert_eq!(starts(&tick(&mut f, t0 + boot::ACK_WAIT)), 0);
    started(&mut f, t0 + boot::ACK_WAIT, "www", None);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));

    // Refused: started at the refusal, answered after the delay.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(t0, Event::SynjitsuUp);
    let tag = booting(&mut f, t0);
    let out = f.handle(t0 + MS, Event::SynjitsuReplied { tag, ok: false });
    assert_eq!(starts(&out), 1);

    // Gone: started when the connection ends.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(t0, Event::SynjitsuUp);
    booting(&mut f, t0);
    assert_eq!(starts(&f.handle(t0 + MS, Event::SynjitsuDown)), 1);

    // Silent: started after ACK_WAIT, which the timer is asked for.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(t0, Event::SynjitsuUp);
    booting(&mut f, t0);
    assert!(f.poll_at().is_some_and(|t| t <= t0 + boot::ACK_WAIT));
    assert_eq!(starts(&tick(&mut f, t0 + boot::ACK_WAIT - MS)), 0);
    assert_eq!(starts(&tick(&mut f, t0 + boot::ACK_WAIT)), 1);
    assert_eq!(starts(&tick(&mut f, t0 + boot::ACK_WAIT * 2)), 0);

    // A resume waits as well.
    let (mut f, t) = running(
        &[spec(
            "www",
            1,
            ",use_synjitsu=true,stop_mode=suspend,response_delay=5",
        )],
        settings(),
    );
    tick(&mut f, t + TTL * 2);
    f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
    f.handle(t + TTL * 2, Event::SynjitsuUp);
    let out = query(&mut f, t + TTL * 3, "www", 7);
    let resumes = |out: &[Command]| {
        out.iter()
            .filter(|c| matches!(c, Command::Resume { .. }))
            .count()
    };
    assert_eq!(resumes(&out), 0);
    let tag = synjitsu(&out)[0].0;
    let out = f.handle(t + TTL * 3, Event::SynjitsuReplied { tag, ok: true });
    assert_eq!(resumes(&out), 1);

    // Without synjitsu: at once.
    let (mut f, t0) = fleet(&www, settings());
    assert_eq!(starts(&query(&mut f, t0, "www", 1)), 1);
}

#[test]
fn use_synjitsu_falls_back_to_the_delay_when_synjitsu_is_down_refuses_or_drops() {
    // Never connected.
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
        settings(),
    );
    let out = query(&mut f, t0, "www", 1);
    assert!(
        synjitsu(&out).is_empty(),
        "nothing is sent to a synjitsu that is down"
    );
    started(&mut f, t0 + MS, "www", None);
    assert!(answers(&tick(&mut f, t0 + MS * 300)).is_empty());
    assert_eq!(
        answers(&tick(&mut f, t0 + MS * 301)),
        vec![(1, Answer::Ready)]
    );

    // Refused.
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "www", 1);
    let tag = synjitsu(&out)[0].0;
    started(&mut f, t0 + MS, "www", None);
    f.handle(t0 + MS * 2, Event::SynjitsuReplied { tag, ok: false });
    assert_eq!(
        answers(&tick(&mut f, t0 + MS * 301)),
        vec![(1, Answer::Ready)]
    );

    // Connection lost while waiting for the ack.
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    query(&mut f, t0, "www", 1);
    started(&mut f, t0 + MS, "www", None);
    assert!(
        answers(&tick(&mut f, t0 + MS * 400)).is_empty(),
        "connected: waits for the ack"
    );
    let out = f.handle(t0 + MS * 500, Event::SynjitsuDown);
    assert_eq!(
        answers(&out),
        vec![(1, Answer::Ready)],
        "down: the delay has passed already"
    );

    // Connected but silent: answered at wait_for_timeout.
    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",use_synjitsu=true,response_delay=0.3,wait_for_timeout=2",
        )],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    query(&mut f, t0, "www", 1);
    started(&mut f, t0, "www", None);
    assert_eq!(f.poll_at(), Some(t0 + Duration::from_secs(2)));
    assert_eq!(
        answers(&tick(&mut f, t0 + Duration::from_secs(2))),
        vec![(1, Answer::Ready)]
    );
}

#[test]
fn wait_for_announce_answers_on_the_guests_announcement_or_at_the_timeout() {
    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",wait_for=announce,wait_for_timeout=3,response_delay=0",
        )],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "www", 1);
    let (tag, msg) = &synjitsu(&out)[0];
    assert!(matches!(msg, ClientMessage::Booting { .. }));
    f.handle(
        t0,
        Event::SynjitsuReplied {
            tag: *tag,
            ok: true,
        },
    );
    let out = started(&mut f, t0 + MS, "www", None);
    assert!(answers(&out).is_empty(), "the ack is not the announcement");
    let out = f.handle(t0 + MS * 800, Event::GuestAnnounced { vm: name("www") });
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert_eq!(lifecycle(&out)[0].2, "guest announced itself");

    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",wait_for=announce,wait_for_timeout=3,response_delay=0",
        )],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    query(&mut f, t0, "www", 1);
    started(&mut f, t0, "www", None);
    assert!(answers(&tick(&mut f, t0 + MS * 2999)).is_empty());
    assert_eq!(
        answers(&tick(&mut f, t0 + MS * 3000)),
        vec![(1, Answer::Ready)]
    );

    // Without synjitsu nobody can announce: the delay applies.
    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",wait_for=announce,wait_for_timeout=3,response_delay=0.2",
        )],
        settings(),
    );
    query(&mut f, t0, "www", 1);
    started(&mut f, t0, "www", None);
    assert_eq!(
        answers(&tick(&mut f, t0 + MS * 200)),
        vec![(1, Answer::Ready)]
    );
}

fn running(specs: &[String], s: Settings) -> (Fleet, Instant) {
    let (mut f, t0) = fleet(specs, s);
    let mut end = t0;
    for vm in f.vms.keys().cloned().collect::<Vec<_>>() {
        let delay = f.view(&vm).unwrap().cfg.response_delay;
        query(&mut f, t0, &vm, 0);
        started(&mut f, t0, &vm, None);
        tick(&mut f, t0 + delay);
        assert_eq!(f.state(&vm), Some(Lifecycle::Running));
        end = end.max(t0 + delay);
    }
    (f, end)
}

#[test]
fn idle_vms_stop_after_twice_the_ttl_and_queries_or_traffic_keep_them_up() {
    let (mut f, t) = running(&[spec("www", 1, "")], settings());
    assert_eq!(f.poll_at(), Some(t + TTL * 2));
    assert!(stops(&tick(&mut f, t + TTL * 2 - MS)).is_empty());
    // A query answered by the shell directly, reported by the tick.
    let out = f.handle(
        t + TTL * 2,
        Event::Tick {
            activity: vec![Activity {
                vm: name("www"),
                queries: 3,
                last: t + TTL,
            }],
        },
    );
    assert!(stops(&out).is_empty(), "queried one TTL ago");
    assert_eq!(f.view("www").unwrap().requests, 4);
    assert_eq!(f.poll_at(), Some(t + TTL * 3));
    // Traffic on its interface (a first sample, then a change); only what the guest
    // sends counts.
    f.handle(
        t + TTL * 2,
        Event::Counters {
            vm: name("www"),
            counters: Some(IfCounters {
                rx_packets: 5,
                tx_packets: 5,
            }),
        },
    );
    f.handle(
        t + TTL * 2 + MS,
        Event::Counters {
            vm: name("www"),
            counters: Some(IfCounters {
                rx_packets: 5,
                tx_packets: 5,
            }),
        },
    );
    assert_eq!(
        f.poll_at(),
        Some(t + TTL * 3),
        "unchanged counters are no traffic"
    );
    f.handle(
        t + TTL * 2 + MS * 2,
        Event::Counters {
            vm: name("www"),
            counters: Some(IfCounters {
                rx_packets: 6,
                tx_packets: 5,
            }),
        },
    );
    assert_eq!(f.poll_at(), Some(t + TTL * 4 + MS * 2));
    assert!(stops(&tick(&mut f, t + TTL * 3)).is_empty());
    let out = tick(&mut f, t + TTL * 4 + MS * 2);
    assert_eq!(stops(&out), vec![StopMode::Destroy]);
    assert_eq!(
        serve(&out),
        Some(false),
        "stopped VMs go back to the slow path first"
    );
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Running,
            Lifecycle::Stopping,
            "idle for 2 s".into()
        )]
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Stopping));
    let out = f.handle(t + TTL * 5, Event::Stopped { vm: name("www") });
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Stopping,
            Lifecycle::Off,
            "stopped (destroy)".into()
        )]
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Off));
}

#[test]
fn each_stop_mode_is_used_and_lands_in_its_state() {
    for (mode, end) in [
        ("destroy", Lifecycle::Off),
        ("shutdown", Lifecycle::Off),
        ("suspend", Lifecycle::Suspended),
    ] {
        let (mut f, t) = running(&[spec("www", 1, &format!(",stop_mode={mode}"))], settings());
        let out = tick(&mut f, t + TTL * 2);
        assert_eq!(stops(&out), vec![mode.parse().unwrap()]);
        f.handle(t + TTL * 3, Event::Stopped { vm: name("www") });
        assert_eq!(f.state("www"), Some(end), "{mode}");
    }
}

#[test]
fn suspended_vms_are_resumed_and_paused_ones_unpaused_not_booted() {
    let (mut f, t) = running(
        &[spec("www", 1, ",stop_mode=suspend,response_delay=5")],
        settings(),
    );
    tick(&mut f, t + TTL * 2);
    f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
    let out = query(&mut f, t + TTL * 3, "www", 7);
    assert_eq!(starts(&out), 0);
    assert!(out.iter().any(|c| matches!(c, Command::Resume { .. })));
    assert_eq!(lifecycle(&out)[0].2, "resume, query from 10.0.0.99");
    // Resuming is not a boot: no response delay, answered as soon as it runs again.
    let out = started(&mut f, t + TTL * 3 + MS, "www", None);
    assert_eq!(answers(&out), vec![(7, Answer::Ready)]);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    assert_eq!(f.view("www").unwrap().starts, 1, "a resume is not a start");

    let (mut f, t0) = fleet(&[spec("p", 1, "")], settings());
    f.handle(
        t0,
        Event::Observed {
            vm: name("p"),
            state: Observed::Paused,
            epoch: None,
        },
    );
    assert_eq!(f.state("p"), Some(Lifecycle::Paused));
    let out = query(&mut f, t0, "p", 1);
    assert!(out.iter().any(|c| matches!(c, Command::Unpause { .. })));
    let out = started(&mut f, t0 + MS, "p", None);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
}

#[test]
fn limits_refuse_with_servfail() {
    let s = Settings {
        max_running: Some(1),
        ..settings()
    };
    let (mut f, t0) = fleet(&[spec("a", 1, ""), spec("b", 2, "")], s);
    assert_eq!(starts(&query(&mut f, t0, "a", 1)), 1);
    let out = query(&mut f, t0, "b", 2);
    assert_eq!(
        answers(&out),
        vec![(2, Answer::ServFail(Refusal::MaxRunning))]
    );
    assert_eq!(starts(&out), 0);
    assert_eq!(f.state("b"), Some(Lifecycle::Off));

    let s = Settings {
        max_boots_per_second: Some(2),
        ..settings()
    };
    let (mut f, t0) = fleet(&[spec("a", 1, ""), spec("b", 2, ""), spec("c", 3, "")], s);
    assert_eq!(starts(&query(&mut f, t0, "a", 1)), 1);
    assert_eq!(starts(&query(&mut f, t0 + MS * 10, "b", 2)), 1);
    let out = query(&mut f, t0 + MS * 999, "c", 3);
    assert_eq!(
        answers(&out),
        vec![(3, Answer::ServFail(Refusal::BootRate))]
    );
    assert!(Refusal::BootRate.is_limit());
    let out = query(&mut f, t0 + MS * 1000, "c", 4);
    assert_eq!(starts(&out), 1, "a second later the rate allows it");
}

#[test]
fn a_failed_boot_answers_servfail_and_the_next_query_retries() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",use_synjitsu=true")], settings());
    f.handle(t0, Event::SynjitsuUp);
    query(&mut f, t0, "www", 1);
    query(&mut f, t0, "www", 2);
    let out = f.handle(
        t0 + MS,
        Event::StartFailed {
            vm: name("www"),
            error: "no such bridge".into(),
        },
    );
    assert_eq!(
        answers(&out),
        vec![
            (1, Answer::ServFail(Refusal::BootFailed)),
            (2, Answer::ServFail(Refusal::BootFailed))
        ]
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Failed));
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Booting,
            Lifecycle::Failed,
            "boot failed: no such bridge".into()
        )]
    );
    assert!(
        synjitsu(&out)
            .iter()
            .any(|(_, m)| matches!(m, ClientMessage::Stopped { .. }))
    );
    let out = query(&mut f, t0 + MS * 2, "www", 3);
    assert_eq!(starts(&ack_booting(&mut f, t0 + MS * 2, &out)), 1);
    assert_eq!(f.view("www").unwrap().starts, 2);
}

#[test]
fn a_synjitsu_guest_that_never_announces_itself_is_failed_and_retried() {
    let boot = |f: &mut Fleet, t: Instant, id: u64| {
        let out = query(f, t, "www", id);
        let (tag, _) = synjitsu(&out)[0].clone();
        f.handle(t, Event::SynjitsuReplied { tag, ok: true });
        started(f, t + MS, "www", None);
    };
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    boot(&mut f, t0, 1);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    assert_eq!(f.poll_at(), Some(t0 + MS * 1501));
    assert!(stops(&tick(&mut f, t0 + MS * 1500)).is_empty());
    let out = tick(&mut f, t0 + MS * 1501);
    assert_eq!(stops(&out), vec![StopMode::Destroy]);
    assert_eq!(
        lifecycle(&out)[0].2,
        "the guest did not announce itself within 1.5 s of its start"
    );
    assert_eq!(serve(&out), Some(false), "no longer answered directly");
    let out = f.handle(t0 + MS * 1510, Event::Stopped { vm: name("www") });
    assert_eq!(f.state("www"), Some(Lifecycle::Failed));
    assert!(
        synjitsu(&out)
            .iter()
            .any(|(_, m)| matches!(m, ClientMessage::Stopped { .. })),
        "synjitsu holds and wakes for it again"
    );
    // The next query boots it again.
    let out = query(&mut f, t0 + MS * 1600, "www", 2);
    assert_eq!(starts(&ack_booting(&mut f, t0 + MS * 1600, &out)), 1);
    assert_eq!(f.view("www").unwrap().starts, 2);

    // A guest that announces itself, even after the answer, is never failed.
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    boot(&mut f, t0, 1);
    f.handle(t0 + MS * 300, Event::GuestAnnounced { vm: name("www") });
    assert!(stops(&tick(&mut f, t0 + MS * 1600)).is_empty());
    assert_eq!(f.state("www"), Some(Lifecycle::Running));

    // Nor when synjitsu, the only witness, went away.
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    boot(&mut f, t0, 1);
    f.handle(t0 + MS * 300, Event::SynjitsuDown);
    assert!(stops(&tick(&mut f, t0 + MS * 1600)).is_empty());

    // Nor when its readiness key appeared: it listens, synjitsu was told `ready`, whether
    // or not the guest ever announces itself (many unmodified guests do not).
    let (mut f, t0) = fleet(
        &[spec(
            "www",
            1,
            ",use_synjitsu=true,boot_timeout=1.5,wait_for_key=/jitsu/www/ready,wait_for_timeout=5",
        )],
        settings(),
    );
    f.handle(t0, Event::SynjitsuUp);
    boot(&mut f, t0, 1);
    let out = f.handle(t0 + MS * 300, Event::KeyAppeared { vm: name("www") });
    assert!(
        synjitsu(&out)
            .iter()
            .any(|(_, m)| matches!(m, ClientMessage::Ready { .. }))
    );
    // Running once the response delay after the key has passed, as in Jitsu.
    tick(&mut f, t0 + MS * 1000);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    assert!(stops(&tick(&mut f, t0 + MS * 1600)).is_empty());
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
}

#[test]
fn a_running_vm_is_adopted_never_booted_twice() {
    let t0 = Instant::now();
    let cfgs = vms(&[
        &spec("www", 1, ""),
        &spec("gone", 2, ""),
        &spec("new", 3, ""),
    ]);
    let mut f = Fleet::new(t0, settings(), cfgs);
    let out = f.handle(
        t0,
        Event::Reconciled {
            vm: name("www"),
            stored: Some(Stored {
                state: Some(Lifecycle::Running),
                starts: 4,
                requests: 90,
                ..Stored::default()
            }),
            observed: Observed::Running { domid: None },
        },
    );
    assert_eq!(starts(&out), 0);
    assert_eq!(serve(&out), Some(true));
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Running,
            Lifecycle::Running,
            "adopted: already running".into()
        )]
    );
    assert_eq!(
        f.view("www").unwrap().starts,
        4,
        "counters continue from the store"
    );
    let out = query(&mut f, t0, "www", 1);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    assert_eq!(starts(&out), 0);

    let out = f.handle(
        t0,
        Event::Reconciled {
            vm: name("gone"),
            stored: Some(Stored {
                state: Some(Lifecycle::Running),
                starts: 1,
                requests: 1,
                ..Stored::default()
            }),
            observed: Observed::Off,
        },
    );
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Running,
            Lifecycle::Off,
            "gone while jitsu-dns was away".into()
        )]
    );
    assert_eq!(f.state("gone"), Some(Lifecycle::Off));

    let out = f.handle(
        t0,
        Event::Reconciled {
            vm: name("new"),
            stored: None,
            observed: Observed::Suspended,
        },
    );
    assert_eq!(f.state("new"), Some(Lifecycle::Suspended));
    assert_eq!(lifecycle(&out)[0].2, "adopted: suspended");
}

#[test]
fn a_vm_that_exits_by_itself_is_off_and_cleaned_up() {
    let (mut f, t) = running(&[spec("www", 1, "")], settings());
    let out = f.handle(
        t,
        Event::Observed {
            vm: name("www"),
            state: Observed::Off,
            epoch: None,
        },
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Off));
    assert_eq!(serve(&out), Some(false));
    assert!(out.iter().any(|c| matches!(c, Command::Cleanup { .. })));
    assert_eq!(starts(&query(&mut f, t, "www", 1)), 1);
}

#[test]
fn wake_requests_boot_like_queries_and_resync_a_running_vm() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",use_synjitsu=true")], settings());
    f.handle(t0, Event::SynjitsuUp);
    let out = f.handle(t0, Event::WakeRequest { vm: name("www") });
    assert_eq!(lifecycle(&out)[0].2, "wake request from synjitsu");
    assert_eq!(f.view("www").unwrap().requests, 0, "not a query");
    assert_eq!(starts(&ack_booting(&mut f, t0, &out)), 1);
    started(&mut f, t0, "www", None);
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    let out = f.handle(t0, Event::WakeRequest { vm: name("www") });
    assert_eq!(starts(&out), 0);
    assert!(matches!(&synjitsu(&out)[0].1, ClientMessage::Ready { name } if name == "www"));
}

#[test]
fn every_reconnect_gets_a_full_sync_with_phases() {
    let (mut f, t0) = fleet(
        &[
            spec("a", 1, ",use_synjitsu=true"),
            spec("b", 2, ",wait_for=announce"),
            spec("c", 3, ""),
        ],
        settings(),
    );
    query(&mut f, t0, "a", 1);
    started(&mut f, t0, "a", None);
    tick(&mut f, t0 + Duration::from_millis(100));
    query(&mut f, t0, "b", 2);
    for _ in 0..2 {
        let out = f.handle(t0, Event::SynjitsuUp);
        let s = synjitsu(&out);
        let ClientMessage::Sync { vms } = &s[0].1 else {
            panic!()
        };
        let phases: Vec<(&str, Phase)> =
            vms.iter().map(|v| (v.vm.name.as_str(), v.phase)).collect();
        assert_eq!(
            phases,
            vec![("a", Phase::Running), ("b", Phase::Booting)],
            "c is not synjitsu's"
        );
        f.handle(t0, Event::SynjitsuDown);
    }
}

#[test]
fn stopped_synjitsu_vms_are_reported_so_synjitsu_can_wake_them() {
    let (mut f, t) = running(&[spec("www", 1, ",use_synjitsu=true")], settings());
    f.handle(t, Event::SynjitsuUp);
    tick(&mut f, t + TTL * 2);
    let out = f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
    assert!(matches!(&synjitsu(&out)[0].1, ClientMessage::Stopped { vm } if vm.name == "www"));
}

#[test]
fn queries_during_a_stop_bring_the_vm_back_afterwards() {
    let (mut f, t) = running(&[spec("www", 1, ",response_delay=0")], settings());
    tick(&mut f, t + TTL * 2);
    let out = query(&mut f, t + TTL * 2 + MS, "www", 5);
    assert!(
        answers(&out).is_empty() && starts(&out) == 0,
        "waits for the stop to finish"
    );
    let out = f.handle(t + TTL * 3, Event::Stopped { vm: name("www") });
    assert_eq!(starts(&out), 1);
    let out = started(&mut f, t + TTL * 3, "www", None);
    assert_eq!(answers(&out), vec![(5, Answer::Ready)]);
}

#[test]
fn a_failed_stop_keeps_the_vm_running_and_served() {
    let (mut f, t) = running(&[spec("www", 1, "")], settings());
    tick(&mut f, t + TTL * 2);
    let out = f.handle(
        t + TTL * 2,
        Event::StopFailed {
            vm: name("www"),
            error: "EPERM".into(),
        },
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Running));
    assert_eq!(serve(&out), Some(true));
    assert_eq!(f.poll_at(), Some(t + TTL * 4));
}

#[test]
fn overload_and_unknown_vms_get_servfail() {
    let (mut f, t0) = fleet(&[spec("www", 1, "")], settings());
    for i in 0..MAX_WAITING_PER_VM as u64 {
        assert!(answers(&query(&mut f, t0, "www", i)).is_empty());
    }
    let out = query(&mut f, t0, "www", 9999);
    assert_eq!(
        answers(&out),
        vec![(9999, Answer::ServFail(Refusal::Overloaded))]
    );
    let out = query(&mut f, t0, "nope", 1);
    assert_eq!(answers(&out), vec![(1, Answer::ServFail(Refusal::Unknown))]);
}

#[test]
fn reconfiguring_adds_and_forgets_vms_without_stopping_them() {
    let (mut f, t) = running(&[spec("a", 1, ""), spec("b", 2, "")], settings());
    query(&mut f, t, "a", 1);
    let new = vms(&[&spec("b", 2, ",response_delay=1"), &spec("c", 3, "")]);
    let out = f.reconfigure(t, new);
    assert!(
        stops(&out).is_empty(),
        "a removed VM is left running, unmanaged"
    );
    assert!(out.contains(&Command::Serve {
        vm: name("a"),
        direct: false
    }));
    assert_eq!(f.state("a"), None);
    assert_eq!(f.state("b"), Some(Lifecycle::Running));
    assert_eq!(
        f.view("b").unwrap().cfg.response_delay,
        Duration::from_secs(1)
    );
    assert_eq!(f.state("c"), Some(Lifecycle::Off));
}

#[test]
fn the_domains_mac_wins_over_the_keys_and_outlives_a_reload() {
    let specs = [
        spec("www", 1, ",use_synjitsu=true"),
        spec("m", 2, ",mac=02:00:00:00:00:02"),
    ];
    let (mut f, t) = fleet(&specs, settings());
    f.handle(t, Event::SynjitsuUp);
    let derived = f.view("www").unwrap().cfg.mac();
    let domain: Mac = "02:aa:00:00:00:77".parse().unwrap();
    let out = f.handle(
        t,
        Event::MacFound {
            vm: name("www"),
            macs: vec![domain],
        },
    );
    assert!(out.contains(&Command::Persist(Persist::Mac {
        vm: name("www"),
        mac: domain,
        configured: derived,
        keyed: false,
    })));
    let told = synjitsu(&out);
    let [(_, ClientMessage::Sync { vms: synced })] = &told[..] else {
        panic!("synjitsu is told at once: {told:?}")
    };
    assert_eq!(synced[0].vm.mac, domain);
    assert_eq!(f.view("www").unwrap().cfg.mac(), domain);
    let same = f.handle(
        t,
        Event::MacFound {
            vm: name("www"),
            macs: vec![domain],
        },
    );
    assert!(same.is_empty(), "{same:?}");
    let out = f.handle(
        t,
        Event::MacFound {
            vm: name("m"),
            macs: vec![domain],
        },
    );
    assert!(matches!(
        &out[..],
        [Command::Persist(Persist::Mac { keyed: true, .. }), ..]
    ));

    // A reload gives the keys' MAC again; the domain's stays.
    let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    f.reconfigure(t, vms(&refs));
    assert_eq!(f.view("www").unwrap().cfg.mac(), domain);
    // Removed, the VM is forgotten with its MAC.
    f.reconfigure(t, vms(&refs[1..]));
    f.reconfigure(t, vms(&refs));
    assert_eq!(f.view("www").unwrap().cfg.mac(), derived);
}

#[test]
fn a_domains_other_nics_macs_are_taken_and_only_the_first_is_steered() {
    let lv = "name=x,dns=x.example.org,ip=10.0.0.9,kernel=/k,nic=br0,nic=br1,mac=02:00:00:00:00:09";
    let t = Instant::now();
    let mut fl = Fleet::new(t, settings(), vms_with("libvirt", &[lv]));
    fl.handle(t, Event::SynjitsuUp);
    let first: Mac = "02:00:00:00:00:09".parse().unwrap();
    let second: Mac = "02:bb:00:00:00:02".parse().unwrap();
    // The first is the keys' own: only the second NIC's MAC changes, and nothing follows.
    let out = fl.handle(
        t,
        Event::MacFound {
            vm: name("x"),
            macs: vec![first, second],
        },
    );
    assert!(out.is_empty(), "{out:?}");
    let cfg = &fl.view("x").unwrap().cfg;
    assert_eq!((cfg.mac(), cfg.nics[1].mac), (first, second));
    // A reload keeps them.
    fl.reconfigure(t, vms_with("libvirt", &[lv]));
    let cfg = &fl.view("x").unwrap().cfg;
    assert_eq!((cfg.mac(), cfg.nics[1].mac), (first, second));
}

#[test]
fn a_lifecycle_record_carries_the_vm_as_it_is_after_the_change() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0")], settings());
    let out = query(&mut f, t0, "www", 1);
    let views: Vec<&VmView> = out
        .iter()
        .filter_map(|c| match c {
            Command::Persist(Persist::Lifecycle { view, to, .. }) => {
                assert_eq!(view.state, *to);
                Some(view)
            }
            _ => None,
        })
        .collect();
    assert_eq!(views.len(), 1);
    assert_eq!(
        (views[0].state, views[0].starts, views[0].requests),
        (Lifecycle::Booting, 1, 1)
    );
    assert_eq!(views[0].last_start, Some(t0));
    let out = started(&mut f, t0 + MS, "www", Some(7));
    let Some(Command::Persist(Persist::Lifecycle { view, .. })) =
        out.iter().find(|c| matches!(c, Command::Persist(_)))
    else {
        panic!("{out:?}")
    };
    assert_eq!((view.state, view.domid), (Lifecycle::Running, Some(7)));
}

#[test]
fn request_counters_are_flushed_in_batches() {
    let (mut f, t0) = fleet(&[spec("www", 1, "")], settings());
    query(&mut f, t0, "www", 1);
    let flushes = |out: &[Command]| {
        out.iter()
            .filter(|c| **c == Command::Persist(Persist::Counters))
            .count()
    };
    assert_eq!(flushes(&tick(&mut f, t0 + Duration::from_secs(5))), 0);
    assert_eq!(
        f.poll_at().map(|p| p <= t0 + COUNTERS_FLUSH_EVERY),
        Some(true)
    );
    assert_eq!(flushes(&tick(&mut f, t0 + COUNTERS_FLUSH_EVERY)), 1);
    assert_eq!(
        flushes(&tick(&mut f, t0 + COUNTERS_FLUSH_EVERY * 3)),
        0,
        "nothing new"
    );
}

#[test]
fn xenstore_handover_tells_synjitsu_once_the_domain_id_is_known() {
    let cfgs = vms_with(
        "libvirt",
        &["name=m,dns=m.example.org,ip=10.0.0.1,use_synjitsu=true,handover=xenstore,kernel=/k"],
    );
    let t0 = Instant::now();
    let mut f = Fleet::new(t0, settings(), cfgs);
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "m", 1);
    assert!(synjitsu(&out).is_empty());
    let out = started(&mut f, t0 + MS, "m", Some(12));
    let s = synjitsu(&out);
    let (tag, ClientMessage::Booting { vm }) = &s[0] else {
        panic!("{s:?}")
    };
    assert_eq!(vm.handover, Handover::Xenstore { domid: 12 });
    let out = f.handle(
        t0 + MS * 2,
        Event::SynjitsuReplied {
            tag: *tag,
            ok: true,
        },
    );
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
}

#[test]
fn stale_polls_are_ignored() {
    let (mut f, t) = running(&[spec("www", 1, "")], settings());
    let (_, epoch) = f.polled()[0].clone();
    // The VM stops and boots again while the poll was out...
    tick(&mut f, t + TTL * 2);
    f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
    query(&mut f, t + TTL * 3, "www", 1);
    started(&mut f, t + TTL * 3, "www", None);
    // ...so its old "off" must not kill the new boot.
    let out = f.handle(
        t + TTL * 3,
        Event::Observed {
            vm: name("www"),
            state: Observed::Off,
            epoch: Some(epoch),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(f.state("www"), Some(Lifecycle::Booting));
    // A current one is heard.
    let out = tick(&mut f, t + TTL * 4);
    assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    let (_, epoch) = f.polled()[0].clone();
    f.handle(
        t + TTL * 4,
        Event::Observed {
            vm: name("www"),
            state: Observed::Off,
            epoch: Some(epoch),
        },
    );
    assert_eq!(f.state("www"), Some(Lifecycle::Off));
}

#[test]
fn durations_read_well() {
    assert_eq!(fmt_duration(Duration::from_secs(2)), "2 s");
    assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5 s");
    assert_eq!(fmt_duration(Duration::from_secs(120)), "120 s");
}

/// The guest's bridge port reaches synjitsu: from the first `booting` where the backend names
/// it before the start (the process backend), else in a `port` once it has started it
/// (libvirt), never an old run's, and never for a stopped VM.
#[test]
fn synjitsu_learns_the_guests_bridge_port_as_soon_as_the_backend_names_it() {
    let booting_port = |out: &[Command]| {
        synjitsu(out).into_iter().find_map(|(_, m)| match m {
            ClientMessage::Booting { vm } => Some(vm.port),
            _ => None,
        })
    };
    let port_msgs = |out: &[Command]| -> Vec<ClientMessage> {
        synjitsu(out)
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| matches!(m, ClientMessage::Port { .. }))
            .collect()
    };
    let start = |f: &mut Fleet, t: Instant, port: Option<&str>| {
        f.handle(
            t,
            Event::Started {
                vm: name("www"),
                domid: None,
                port: port.map(str::to_string),
            },
        )
    };
    let www = [spec("www", 1, ",use_synjitsu=true,response_delay=0")];

    // Named before the start: in the first booting, and not again.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(
        t0,
        Event::PortFound {
            vm: name("www"),
            port: "jwww0123456".into(),
        },
    );
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "www", 1);
    assert_eq!(booting_port(&out), Some(Some("jwww0123456".into())));
    assert!(port_msgs(&start(&mut f, t0 + MS, Some("jwww0123456"))).is_empty());

    // Named only once it runs: a port message then, and a new one at the next boot.
    let (mut f, t0) = fleet(&www, settings());
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "www", 1);
    assert_eq!(booting_port(&out), Some(None));
    let out = start(&mut f, t0 + MS, Some("vnet3"));
    assert_eq!(
        port_msgs(&out),
        vec![ClientMessage::Port {
            name: "www".into(),
            port: "vnet3".into()
        }]
    );
    // A reconnect while it runs tells the port with the VM.
    let out = f.handle(t0 + MS * 2, Event::SynjitsuUp);
    let Some((_, ClientMessage::Sync { vms })) = synjitsu(&out).pop() else {
        panic!("{out:?}")
    };
    assert_eq!(vms[0].vm.port.as_deref(), Some("vnet3"));
    // Stopped: no port (it may be another guest's by now); booted again: not the old one.
    let out = f.handle(
        t0 + MS * 3,
        Event::Observed {
            vm: name("www"),
            state: Observed::Off,
            epoch: None,
        },
    );
    for (_, m) in synjitsu(&out) {
        if let ClientMessage::Stopped { vm } = m {
            assert_eq!(vm.port, None);
        }
    }
    let out = f.handle(t0 + MS * 4, Event::SynjitsuUp);
    let Some((_, ClientMessage::Sync { vms })) = synjitsu(&out).pop() else {
        panic!("{out:?}")
    };
    assert_eq!(
        (vms[0].phase, vms[0].vm.port.as_deref()),
        (Phase::Stopped, None)
    );
    let out = query(&mut f, t0 + Duration::from_secs(10), "www", 2);
    assert_eq!(booting_port(&out), Some(None), "not the old run's vnet3");
    let out = start(&mut f, t0 + Duration::from_secs(10) + MS, Some("vnet7"));
    assert_eq!(port_msgs(&out).len(), 1);
}

// ---- per-VM policies and operator actions (issue 14) ----

const SEC: Duration = Duration::from_secs(1);

fn act(f: &mut Fleet, t: Instant, vm: &str, action: Action, id: u64) -> Result<Acted, ActError> {
    f.act(t, vm, action, 1000, QueryId(id))
}

fn failed(f: &mut Fleet, t: Instant, vm: &str) -> Vec<Command> {
    f.handle(
        t,
        Event::StartFailed {
            vm: name(vm),
            error: "no such bridge".into(),
        },
    )
}

fn policies(out: &[Command]) -> Vec<(&'static str, String)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Persist(Persist::Policy { what, cause, .. }) => Some((*what, cause.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_pinned_vm_is_never_stopped_for_idleness_until_unpinned() {
    let (mut f, t) = running(&[spec("www", 1, ",pin=true")], settings());
    // The query's counter is flushed; then nothing is due for a pinned VM.
    assert!(stops(&tick(&mut f, t + COUNTERS_FLUSH_EVERY)).is_empty());
    assert_eq!(f.poll_at(), None, "nothing due for a pinned VM");
    assert!(stops(&tick(&mut f, t + TTL * 100)).is_empty());
    assert!(f.view("www").unwrap().pinned);
    // ctl unpin outranks the key; the idle period already passed.
    let acted = act(&mut f, t + TTL * 100, "www", Action::Unpin, 1).unwrap();
    assert_eq!(acted.reply, Reply::Done("www unpinned".into()));
    assert_eq!(
        policies(&acted.commands),
        vec![("unpinned", "ctl unpin by uid 1000".into())]
    );
    assert_eq!(stops(&tick(&mut f, t + TTL * 100)), vec![StopMode::Destroy]);
}

#[test]
fn ctl_pin_is_kept_by_the_store_and_taken_back_at_reconciliation() {
    let (mut f, t) = running(&[spec("www", 1, "")], settings());
    let acted = act(&mut f, t, "www", Action::Pin, 1).unwrap();
    let Some(Command::Persist(Persist::Policy { view, .. })) = acted.commands.first() else {
        panic!("{acted:?}");
    };
    assert_eq!(view.pin_override, Some(true));
    assert_eq!(
        act(&mut f, t, "www", Action::Pin, 2).unwrap().reply,
        Reply::Done("www is already pinned".into())
    );
    // A new jitsu-dns: the store says pinned, the backend says running.
    let mut g = Fleet::new(t, settings(), vms(&[&spec("www", 1, "")]));
    g.handle(
        t,
        Event::Reconciled {
            vm: name("www"),
            stored: Some(Stored {
                state: Some(Lifecycle::Running),
                pin: Some(true),
                ..Stored::default()
            }),
            observed: Observed::Running { domid: None },
        },
    );
    assert!(g.view("www").unwrap().pinned);
    assert!(stops(&tick(&mut g, t + TTL * 10)).is_empty());
}

#[test]
fn idle_timeout_is_per_vm_and_twice_the_ttl_by_default() {
    let (mut f, t) = running(
        &[spec("a", 1, ",idle_timeout=5"), spec("b", 2, "")],
        settings(),
    );
    assert_eq!(f.view("a").unwrap().idle_deadline, Some(t + SEC * 5));
    assert_eq!(f.view("b").unwrap().idle_deadline, Some(t + TTL * 2));
    assert_eq!(stops(&tick(&mut f, t + TTL * 2)).len(), 1, "b only");
    assert_eq!(f.state("a"), Some(Lifecycle::Running));
    let out = tick(&mut f, t + SEC * 5);
    assert_eq!(
        lifecycle(&out),
        vec![(
            Lifecycle::Running,
            Lifecycle::Stopping,
            "idle for 5 s".into()
        )]
    );
}

#[test]
fn a_drained_vm_answers_by_its_policy_boots_for_nothing_and_stops_when_idle_even_pinned() {
    let (mut f, t) = running(
        &[spec("a", 1, ",pin=true"), spec("b", 2, ",drained=nxdomain")],
        settings(),
    );
    for vm in ["a", "b"] {
        let acted = act(&mut f, t, vm, Action::Drain, 1).unwrap();
        assert_eq!(policies(&acted.commands)[0].0, "drained");
    }
    // Running: still answered (by the shell's table) until idle; then stopped, pin or not.
    let out = tick(&mut f, t + TTL * 2);
    assert_eq!(stops(&out).len(), 2, "{out:?}");
    assert!(
        lifecycle(&out)
            .iter()
            .all(|l| l.2 == "drained, idle for 2 s")
    );
    f.handle(t + TTL * 2, Event::Stopped { vm: name("a") });
    f.handle(t + TTL * 2, Event::Stopped { vm: name("b") });
    let out = query(&mut f, t + TTL * 3, "a", 7);
    assert_eq!(answers(&out), vec![(7, Answer::ServFail(Refusal::Drained))]);
    let out = query(&mut f, t + TTL * 3, "b", 8);
    assert_eq!(answers(&out), vec![(8, Answer::NxDomain)]);
    assert_eq!(starts(&out), 0);
    // Nor does ctl start or a wake request boot it.
    assert!(matches!(
        act(&mut f, t + TTL * 3, "a", Action::Start, 9),
        Err(ActError::Refused(_))
    ));
    assert_eq!(
        starts(&f.handle(t + TTL * 3, Event::WakeRequest { vm: name("a") })),
        0
    );
    act(&mut f, t + TTL * 3, "a", Action::Undrain, 10).unwrap();
    assert_eq!(starts(&query(&mut f, t + TTL * 4, "a", 11)), 1);
}

#[test]
fn after_max_boot_attempts_failures_queries_wait_a_doubling_back_off() {
    let (mut f, t0) = fleet(
        &[spec("www", 1, ",max_boot_attempts=2,boot_backoff=10")],
        settings(),
    );
    query(&mut f, t0, "www", 1);
    failed(&mut f, t0, "www");
    assert_eq!(
        starts(&query(&mut f, t0 + SEC, "www", 2)),
        1,
        "one failure: retried"
    );
    failed(&mut f, t0 + SEC, "www");
    let v = f.view("www").unwrap();
    assert_eq!(v.failures, 2);
    assert_eq!(v.backoff_until, Some(t0 + SEC * 11));
    let out = query(&mut f, t0 + SEC * 10, "www", 3);
    assert_eq!(answers(&out), vec![(3, Answer::ServFail(Refusal::BackOff))]);
    assert_eq!(starts(&out), 0);
    assert_eq!(starts(&query(&mut f, t0 + SEC * 11, "www", 4)), 1);
    failed(&mut f, t0 + SEC * 11, "www");
    assert_eq!(
        f.view("www").unwrap().backoff_until,
        Some(t0 + SEC * 31),
        "doubled"
    );
    // ctl start goes past the back-off; a boot that comes up resets the count.
    let acted = act(&mut f, t0 + SEC * 12, "www", Action::Start, 5).unwrap();
    assert_eq!(acted.reply, Reply::Wait);
    assert_eq!(starts(&acted.commands), 1);
    assert_eq!(
        lifecycle(&acted.commands)[0].2,
        "ctl start by uid 1000".to_string()
    );
    let out = started(&mut f, t0 + SEC * 12, "www", None);
    let out = [out, tick(&mut f, t0 + SEC * 13)].concat();
    assert_eq!(answers(&out), vec![(5, Answer::Ready)]);
    let v = f.view("www").unwrap();
    assert_eq!((v.failures, v.backoff_until), (0, None));
}

#[test]
fn ctl_start_stop_and_restart_wait_for_the_vm_and_refuse_what_cannot_be_done() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0.1")], settings());
    assert_eq!(
        act(&mut f, t0, "nope", Action::Start, 1).unwrap_err(),
        ActError::UnknownVm("nope".into())
    );
    let acted = act(&mut f, t0, "www", Action::Start, 1).unwrap();
    assert_eq!(acted.reply, Reply::Wait);
    assert_eq!(f.view("www").unwrap().requests, 0, "not a query");
    assert!(matches!(
        act(&mut f, t0, "www", Action::Stop(None), 2),
        Err(ActError::Refused(m)) if m.contains("booting")
    ));
    started(&mut f, t0, "www", None);
    assert_eq!(
        answers(&tick(&mut f, t0 + MS * 100)),
        vec![(1, Answer::Ready)]
    );
    let t = t0 + MS * 100;
    assert_eq!(
        act(&mut f, t, "www", Action::Start, 3).unwrap().reply,
        Reply::Done("www is running".into())
    );
    // Stop in the mode asked, answered when the backend stopped it.
    let acted = act(&mut f, t, "www", Action::Stop(Some(StopMode::Suspend)), 4).unwrap();
    assert_eq!(stops(&acted.commands), vec![StopMode::Suspend]);
    assert!(answers(&acted.commands).is_empty());
    let out = f.handle(t, Event::Stopped { vm: name("www") });
    assert_eq!(answers(&out), vec![(4, Answer::Ready)]);
    assert_eq!(f.state("www"), Some(Lifecycle::Suspended));
    // Restart a suspended VM: destroyed (a suspend would only freeze it), booted afresh.
    let acted = act(&mut f, t, "www", Action::Restart, 5).unwrap();
    assert_eq!(stops(&acted.commands), vec![StopMode::Destroy]);
    let out = f.handle(t, Event::Stopped { vm: name("www") });
    assert_eq!(starts(&out), 1);
    assert_eq!(
        lifecycle(&out).last().unwrap().2,
        "ctl restart by uid 1000".to_string()
    );
    started(&mut f, t, "www", None);
    assert_eq!(
        answers(&tick(&mut f, t + MS * 100)),
        vec![(5, Answer::Ready)]
    );
    // A stop that fails is answered so.
    act(&mut f, t + MS * 100, "www", Action::Stop(None), 6).unwrap();
    let out = f.handle(
        t + MS * 100,
        Event::StopFailed {
            vm: name("www"),
            error: "busy".into(),
        },
    );
    assert_eq!(
        answers(&out),
        vec![(6, Answer::ServFail(Refusal::StopFailed))]
    );
    assert_eq!(
        f.view("www").unwrap().last_error.as_deref(),
        Some("stop failed: busy")
    );
    assert_eq!(
        act(&mut f, t0, "www", Action::Stop(None), 7).map(|a| a.reply),
        Ok(Reply::Wait)
    );
    f.handle(t0, Event::Stopped { vm: name("www") });
    // A restart whose stop fails is answered so, not as restarted.
    act(&mut f, t0, "www", Action::Start, 8).unwrap();
    started(&mut f, t0, "www", None);
    tick(&mut f, t0 + MS * 100);
    act(&mut f, t0 + MS * 100, "www", Action::Restart, 9).unwrap();
    let out = f.handle(
        t0 + MS * 100,
        Event::StopFailed {
            vm: name("www"),
            error: "busy".into(),
        },
    );
    assert_eq!(
        answers(&out),
        vec![(9, Answer::ServFail(Refusal::StopFailed))]
    );
    // Requests waiting on a VM that a reload removes are answered, not left hanging.
    act(&mut f, t0 + MS * 100, "www", Action::Stop(None), 10).unwrap();
    let out = f.reconfigure(t0 + MS * 100, vms(&[&spec("other", 2, "")]));
    assert_eq!(
        answers(&out),
        vec![(10, Answer::ServFail(Refusal::Unknown))]
    );
}

#[test]
fn cold_starts_keep_when_each_boot_was_answered_handed_over_and_first_heard() {
    let (mut f, t0) = fleet(&[spec("www", 1, ",use_synjitsu=true")], settings());
    f.handle(t0, Event::SynjitsuUp);
    let out = query(&mut f, t0, "www", 1);
    let (tag, _) = synjitsu(&out)[0].clone();
    f.handle(t0 + MS * 5, Event::SynjitsuReplied { tag, ok: true });
    started(&mut f, t0 + MS * 50, "www", None);
    f.handle(t0 + MS * 80, Event::GuestAnnounced { vm: name("www") });
    let c = |rx| Event::Counters {
        vm: name("www"),
        counters: Some(IfCounters {
            rx_packets: rx,
            tx_packets: 0,
        }),
    };
    f.handle(t0 + MS * 100, c(1));
    f.handle(t0 + MS * 300, c(4));
    let cs = f.cold_starts();
    assert_eq!(cs.len(), 1);
    assert_eq!(cs[0].answered, Some(t0 + MS * 5));
    assert_eq!(cs[0].handed_over, Some(t0 + MS * 80));
    assert_eq!(cs[0].first_packet, Some(t0 + MS * 300));
    assert!(!cs[0].failed);
    f.handle(t0 + MS * 300, Event::SynjitsuDown);
    for i in 0..(COLD_STARTS_KEPT as u64 + 5) {
        let t = t0 + SEC * (i as u32 + 1);
        f.act(t, "www", Action::Stop(None), 0, QueryId(100 + i))
            .unwrap();
        f.handle(t, Event::Stopped { vm: name("www") });
        query(&mut f, t, "www", 200 + i);
        failed(&mut f, t, "www");
        f.act(t, "www", Action::Start, 0, QueryId(300 + i)).unwrap();
        started(&mut f, t, "www", None);
        tick(&mut f, t + SEC / 2);
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
    }
    assert_eq!(f.cold_starts().len(), COLD_STARTS_KEPT, "bounded");
    assert!(f.cold_starts().iter().any(|c| c.failed));
}
