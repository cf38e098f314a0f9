//! `examples/grafana/jitsu.json`, the Grafana dashboard for both daemons' Prometheus metrics:
//! it is JSON Grafana imports (a dashboard with a Prometheus data source variable and a query
//! in every panel), and every metric it queries is one the real daemons serve, scraped from
//! their `/metrics` after a cold start through both (so that histograms, labelled families and
//! per-VM series are all there).

use std::collections::BTreeSet;
use std::time::Duration;

use jitsu_tests::curl::metrics;
use jitsu_tests::e2e::{
    JITSU_METRICS, Mask, Options, SYNJITSU_METRICS, Stack, Vm, require_stack_tools,
};
use jitsu_tests::repo_root;
use serde_json::Value;

fn dashboard() -> Value {
    let path = repo_root().join("examples/grafana/jitsu.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every `expr` in the dashboard, with the title of its panel.
fn exprs(v: &Value, panel: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            let title = m.get("title").and_then(Value::as_str).unwrap_or(panel);
            if let Some(e) = m.get("expr").and_then(Value::as_str) {
                out.push((title.to_string(), e.to_string()));
            }
            for child in m.values() {
                exprs(child, title, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| exprs(c, panel, out)),
        _ => {}
    }
}

/// The metric names a PromQL expression uses: identifiers starting with either daemon's
/// prefix (`$jitsu_dns`, a variable, is not one).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| ident(c)) {
        let before = rest[..i].chars().last();
        let len = rest[i..]
            .find(|c: char| !ident(c))
            .unwrap_or(rest.len() - i);
        let word = &rest[i..i + len];
        if before != Some('$') && (word.starts_with("jitsu_dns_") || word.starts_with("synjitsu_"))
        {
            names.insert(word.to_string());
        }
        rest = &rest[i + len..];
    }
    names
}

/// The sample names in Prometheus text (`jitsu_dns_boots_total`,
/// `jitsu_dns_boot_to_ready_seconds_bucket`...).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some());
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable, so the dashboard imports anywhere"
    );
    let panels = d["panels"].as_array().expect("panels");
    let mut graphs = 0;
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("a panel id")),
            "ids are unique"
        );
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        let title = p["title"].as_str().expect("a title");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let e = t["expr"].as_str().unwrap_or_default();
            assert!(
                !metric_names(e).is_empty(),
                "{title}: {e:?} queries no metric"
            );
        }
    }
    assert!(graphs >= 10, "{graphs} panels");
    assert_eq!(
        metric_names(
            r#"sum(rate(jitsu_dns_boots_total{instance=~"$jitsu_dns"}[5m])) / synjitsu_held_syns"#
        ),
        ["jitsu_dns_boots_total", "synjitsu_held_syns"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_served_by_its_daemon() {
    require_stack_tools();
    let vm = Vm::new(0, Mask::SynjitsuProbe, Duration::from_millis(200));
    let stack = Stack::start("graf", vec![vm.clone()], Options::default()).unwrap();
    let got = stack.cached_start(&vm).unwrap();
    assert!(got.ok(), "{got:?}\n{}", stack.logs());
    let jitsu = sample_names(&metrics(stack.host.ns(), JITSU_METRICS).unwrap());
    let synjitsu = sample_names(&metrics(stack.host.ns(), SYNJITSU_METRICS).unwrap());
    assert!(jitsu.contains("jitsu_dns_boots_total") && synjitsu.contains("synjitsu_vm_phase"));

    let mut queried = Vec::new();
    exprs(&dashboard(), "", &mut queried);
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (panel, e) in &queried {
        for name in metric_names(e) {
            let served = if name.starts_with("jitsu_dns_") {
                &jitsu
            } else {
                &synjitsu
            };
            if !served.contains(&name) {
                missing.push(format!("{panel}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:#?}\njitsu-dns serves {jitsu:#?}\nsynjitsu serves {synjitsu:#?}"
    );
    println!("{} metrics queried, all served", used.len());
}
