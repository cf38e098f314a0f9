//! curl, the tests' one HTTP client: a URL fetched from inside a namespace, with the page and
//! what curl measured and reported (name lookup, connect and first-byte times, HTTP status,
//! exit code, error), run to completion or started in the background; and the daemons'
//! Prometheus metrics scraped with it. It does not judge a fetch: [`Fetched::ok`] says whether
//! the page came, and each test decides what a failure means.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Netns;

/// Where curl's report starts on its stderr (after any error message of `-S`).
const REPORT: &str = "curl-report:";

/// One GET of a URL by curl, built up then run in a namespace.
#[derive(Debug, Clone)]
pub struct Curl {
    url: String,
    limits: Vec<String>,
}

/// What curl reported about one fetch.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// The page (empty unless the server answered with a success status).
    pub body: String,
    /// `time_namelookup`.
    pub namelookup: Duration,
    /// `time_connect`.
    pub connect: Duration,
    /// `time_starttransfer`: the first byte of the answer.
    pub first_byte: Duration,
    /// The HTTP status, `000` if no answer came.
    pub http_code: String,
    /// curl's exit code: 0, 7 (could not connect), 22 (an HTTP error), 28 (timed out)...
    pub exit: i32,
    /// curl's error message, empty on success.
    pub error: String,
}

impl Fetched {
    /// True if the page arrived whole with `200 OK`.
    pub fn ok(&self) -> bool {
        self.exit == 0 && self.http_code == "200"
    }

    /// Parses curl's report (the last [`REPORT`] line of its stderr) and its stdout.
    fn parse(stdout: &[u8], stderr: &[u8]) -> Result<Fetched> {
        let err = String::from_utf8_lossy(stderr);
        let Some(report) = err.lines().rev().find_map(|l| l.strip_prefix(REPORT)) else {
            bail!("curl printed no report: {err}");
        };
        let mut w = report.trim_start().splitn(6, ' ');
        let mut secs = || -> Result<Duration> {
            let v = w.next().context("a time in curl's report")?;
            Ok(Duration::from_secs_f64(
                v.parse().with_context(|| format!("time {v:?}"))?,
            ))
        };
        let (namelookup, connect, first_byte) = (secs()?, secs()?, secs()?);
        let http_code = w
            .next()
            .context("curl's report has no HTTP code")?
            .to_string();
        let exit = w
            .next()
            .and_then(|v| v.parse().ok())
            .context("curl's report has no exit code")?;
        Ok(Fetched {
            body: String::from_utf8_lossy(stdout).into_owned(),
            namelookup,
            connect,
            first_byte,
            http_code,
            exit,
            error: w.next().unwrap_or("").trim().to_string(),
        })
    }
}

/// A curl started in the background ([`Curl::spawn`]).
#[derive(Debug)]
pub struct Running(Child);

impl Running {
    /// Waits for curl to finish and returns its report.
    pub fn wait(self) -> Result<Fetched> {
        let out = self.0.wait_with_output().context("waiting for curl")?;
        Fetched::parse(&out.stdout, &out.stderr)
    }
}

impl Curl {
    /// A GET of `url` with no time limit of its own.
    pub fn get(url: impl Into<String>) -> Curl {
        Curl {
            url: url.into(),
            limits: Vec::new(),
        }
    }

    /// Gives up after `limit` in all (`--max-time`).
    pub fn max_time(mut self, limit: Duration) -> Curl {
        self.limits
            .extend(["--max-time".into(), limit.as_secs_f64().to_string()]);
        self
    }

    /// Gives up connecting after `limit` (`--connect-timeout`).
    pub fn connect_timeout(mut self, limit: Duration) -> Curl {
        self.limits
            .extend(["--connect-timeout".into(), limit.as_secs_f64().to_string()]);
        self
    }

    fn command(&self, ns: &Netns) -> Command {
        let mut c = ns.command("curl");
        // --fail: an HTTP error is a failure with its own exit code (22), not a page;
        // --globoff: `[fd77::1]` is an address, not a pattern.
        c.args(["--silent", "--show-error", "--fail", "--globoff"])
            .args(&self.limits)
            .arg("--write-out")
            .arg(format!(
                "%{{stderr}}\n{REPORT} %{{time_namelookup}} %{{time_connect}} \
                 %{{time_starttransfer}} %{{http_code}} %{{exitcode}} %{{errormsg}}\n"
            ))
            .arg(&self.url)
            .stdin(Stdio::null());
        c
    }

    /// Runs curl in `ns` to the end. Fails only if curl could not run; a fetch that failed
    /// is in the result.
    pub fn run(&self, ns: &Netns) -> Result<Fetched> {
        let out = self
            .command(ns)
            .output()
            .with_context(|| format!("running curl {} in {}", self.url, ns.name()))?;
        Fetched::parse(&out.stdout, &out.stderr)
    }

    /// Starts curl in `ns` and returns at once.
    pub fn spawn(&self, ns: &Netns) -> Result<Running> {
        let child = self
            .command(ns)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting curl {} in {}", self.url, ns.name()))?;
        Ok(Running(child))
    }

    /// The page, or an error saying how the fetch failed.
    pub fn body(&self, ns: &Netns) -> Result<String> {
        let got = self.run(ns)?;
        if !got.ok() {
            bail!(
                "curl {} in {}: exit {}, HTTP {}: {}",
                self.url,
                ns.name(),
                got.exit,
                got.http_code,
                got.error
            );
        }
        Ok(got.body)
    }
}

/// The Prometheus text a daemon serves at `http://<addr>/metrics`, scraped from inside `ns`.
pub fn metrics(ns: &Netns, addr: &str) -> Result<String> {
    Curl::get(format!("http://{addr}/metrics"))
        .max_time(Duration::from_secs(5))
        .body(ns)
}

/// One sample (`name` with its labels, exactly as printed) of the metrics at `addr`; 0 if
/// absent or if the daemon does not answer.
pub fn metric(ns: &Netns, addr: &str, name: &str) -> f64 {
    metrics(ns, addr)
        .map(|text| metric_in(&text, name))
        .unwrap_or(0.0)
}

/// A sample's value in metrics text; 0 if absent.
pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curls_report_is_parsed_after_its_error_message() {
        let got = Fetched::parse(
            b"hello\n",
            b"curl-report: 0.000021 0.001250 0.301500 200 0 \n",
        )
        .unwrap();
        assert!(got.ok());
        assert_eq!(got.body, "hello\n");
        assert_eq!(got.connect, Duration::from_micros(1250));
        assert_eq!(got.first_byte, Duration::from_micros(301_500));
        let failed = Fetched::parse(
            b"",
            b"curl: (7) Failed to connect to 10.77.0.9 port 80 after 3 ms: Couldn't connect to \
              server\n\ncurl-report: 0.000031 0.000000 0.000000 000 7 Failed to connect to \
              10.77.0.9 port 80 after 3 ms: Couldn't connect to server\n",
        )
        .unwrap();
        assert!(!failed.ok());
        assert_eq!((failed.exit, failed.http_code.as_str()), (7, "000"));
        assert!(failed.error.ends_with(": Couldn't connect to server"));
        assert!(Fetched::parse(b"", b"curl: (2) no report\n").is_err());
    }

    #[test]
    fn samples_are_found_by_their_exact_name_and_labels() {
        let text = "# TYPE x counter\nx_total{via=\"wire\"} 3\nx_total 1\n";
        assert_eq!(metric_in(text, "x_total{via=\"wire\"}"), 3.0);
        assert_eq!(metric_in(text, "x_total"), 1.0);
        assert_eq!(metric_in(text, "y_total"), 0.0);
    }
}
