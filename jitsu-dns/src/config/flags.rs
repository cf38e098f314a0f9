//! The settings as given: [`Flags`], one struct that clap reads from the command line and serde
//! from the file's top level, so each setting is listed once, with its flag, its help and its
//! file key. Values stay as given ([`Given`]: a flag's text, or a file value with its place)
//! until [`super::load`] validates them, so that flags, file and specs share one parser and
//! one kind of error message.
//!
//! The names follow from the fields: the long flag is the field in kebab-case (clap's rule),
//! the file key the field itself.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::error::{ConfigError, Origin, invalid};
use super::file::{FileSettings, toml_strings};

/// The command line as given, and the top level of the file (which has no `config` and no
/// specs: `[[vm]]` tables instead).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    /// Address to serve DNS on [default: 127.0.0.1].
    #[arg(short = 'b', long, value_name = "IP")]
    pub bind: Option<Given>,
    /// Port to serve DNS on [default: 53].
    #[arg(short = 'l', long, value_name = "PORT")]
    pub listen: Option<Given>,
    /// Where other names go: IPs (comma-separated); empty: /etc/resolv.conf; 0.0.0.0: refuse
    /// [default: empty].
    #[arg(short = 'f', long, value_name = "IP")]
    pub forwarder: Option<Given>,
    /// Port of the forwarders (Jitsu's -p/--port) [default: 53].
    #[arg(short = 'p', long, visible_alias = "port", value_name = "PORT")]
    pub forwarder_port: Option<Given>,
    /// Default response delay in seconds (masks a boot when nothing better is configured)
    /// [default: 0.1].
    #[arg(short = 'd', long, value_name = "SECONDS")]
    pub delay: Option<Given>,
    /// TTL of answers in seconds; VMs idle for twice this are stopped [default: 60].
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub ttl: Option<Given>,
    /// Default stop mode: destroy, suspend or shutdown [default: destroy].
    #[arg(short = 'm', long, value_name = "MODE")]
    pub mode: Option<Given>,
    /// Backend: process (a command in a network namespace), libvirt, or libxl (libvirt's
    /// libxl driver, xen:///system) [default: from --connect: process for a process: URI,
    /// libvirt for any other; without --connect: process].
    #[arg(short = 'x', long, value_name = "BACKEND")]
    pub backend: Option<Given>,
    /// Backend URI: process:///run/jitsu/process?netns_prefix=jitsu-&cgroup=auto, or a libvirt
    /// URI (xen:///, xen:///system, qemu:///system, test:///default...), plus
    /// ?shutdown_grace=SECONDS [default: process:///run/jitsu/process; for libvirt,
    /// libvirt's own default, as for virsh].
    #[arg(short = 'c', long, value_name = "URI")]
    pub connect: Option<Given>,
    /// Path of synjitsu's control socket (not a UUID, as Jitsu 0.2 took) [default: none, no
    /// synjitsu].
    #[arg(long, value_name = "SOCKET")]
    pub synjitsu: Option<Given>,
    /// Git repository holding the state and its history [default: a temporary one].
    #[arg(long, value_name = "DIR")]
    pub persistdb: Option<Given>,
    /// The TOML file with the same settings and `[[vm]]` tables; re-read on SIGHUP.
    #[arg(
        long,
        value_name = "FILE",
        help = "TOML file with the same settings and [[vm]] tables; re-read on SIGHUP \
                [default: none]"
    )]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: none].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<Given>,
    /// Log level or filter (error, warn, info, debug, trace, or an EnvFilter directive)
    /// [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<Given>,
    /// At most this many VMs booting or running; past it, queries get SERVFAIL [default:
    /// unlimited].
    #[arg(long, value_name = "N")]
    pub max_running: Option<Given>,
    /// At most this many boots per second; past it, queries get SERVFAIL [default:
    /// unlimited].
    #[arg(long, value_name = "M")]
    pub max_boots_per_second: Option<Given>,
    /// A reload (SIGHUP) that would remove more than this share of the VMs is refused; 1.0
    /// allows removing them all [default: 0.5].
    #[arg(long, value_name = "SHARE")]
    pub max_removed_share: Option<Given>,
    /// Clients that may use the forwarders: networks, comma-separated; others get REFUSED for
    /// names outside the zones [default: loopback and the networks of the bind address].
    #[arg(long, value_name = "CIDR")]
    pub forward_clients: Option<Given>,
    /// At most this many forwarded queries in flight; past it, SERVFAIL at once [default:
    /// 150].
    #[arg(long, value_name = "N")]
    pub forward_max: Option<Given>,
    /// At most this many DNS-over-TCP connections at once; past it, new ones are closed
    /// [default: 150].
    #[arg(long, value_name = "N")]
    pub tcp_max_clients: Option<Given>,
    /// At most this many DNS-over-TCP connections from one client (an IPv6 client: its /64)
    /// [default: 16].
    #[arg(long, value_name = "N")]
    pub tcp_max_per_client: Option<Given>,
    /// VM specs: name=www,dns=www.example.org,ip=10.0.0.1,...
    #[arg(value_name = "VM")]
    #[serde(skip)]
    pub specs: Vec<String>,
}

/// A setting's value as given: a flag's text, or a value in the file with its place.
#[derive(Debug, Clone)]
pub struct Given(Source);

#[derive(Debug, Clone)]
enum Source {
    Flag(String),
    File(Spanned<toml::Value>),
}

impl From<String> for Given {
    fn from(text: String) -> Given {
        Given(Source::Flag(text))
    }
}

impl From<&str> for Given {
    fn from(text: &str) -> Given {
        Given(Source::Flag(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for Given {
    /// Any TOML value, kept with its span: what it may be is for [`Given::text`] to say.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Given, D::Error> {
        Spanned::<toml::Value>::deserialize(d).map(|v| Given(Source::File(v)))
    }
}

impl Given {
    /// The value of setting `key` as a flag would carry it (a list of the file's as the
    /// comma-separated text `-f` takes), and where it was given (`file`: the file it was
    /// read from).
    pub(super) fn text(
        &self,
        key: &str,
        file: Option<&FileSettings>,
    ) -> Result<(String, Origin), ConfigError> {
        let (v, o) = match (&self.0, file) {
            (Source::Flag(text), _) => return Ok((text.clone(), flag_origin(key))),
            (Source::File(v), Some(file)) => (v, file.origin(v.span(), None)),
            // Deserialized elsewhere than by `from_toml`: no file to place it in.
            (Source::File(v), None) => (v, flag_origin(key)),
        };
        let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
        Ok((strings.join(","), o))
    }
}

/// The flag of setting `key`: clap names a long flag after its field, in kebab-case.
fn flag_origin(key: &str) -> Origin {
    Origin::Flag(format!("--{}", key.replace('_', "-")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Args as _;

    use super::*;
    use crate::config::{from_toml, merge};

    fn file_error(text: &str) -> String {
        from_toml(text, Path::new("j.toml"))
            .and_then(|f| merge(&Flags::default(), Some(&f)))
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn every_flag_but_config_and_the_specs_is_a_file_key() {
        let cmd = Flags::augment_args(clap::Command::new("jitsu-dns"));
        let mut n = 0;
        for arg in cmd.get_arguments() {
            let key = arg.get_id().as_str();
            let e = file_error(&format!("{key} = \"?\"\n"));
            if key == "config" || key == "specs" {
                assert!(e.contains(&format!("unknown field `{key}`")), "{key}: {e}");
            } else {
                n += 1;
                assert!(!e.contains("unknown field"), "{key}: {e}");
                let long = arg.get_long().expect("every setting has a long flag");
                assert_eq!(long, key.replace('_', "-"), "the flag is the key");
            }
        }
        assert_eq!(n, 20, "the settings");
    }

    #[test]
    fn port_is_the_forwarders_port_as_in_jitsu() {
        use clap::FromArgMatches as _;
        let cmd = || Flags::augment_args(clap::Command::new("jitsu-dns"));
        for args in [
            &["j", "--port", "5300"][..],
            &["j", "-p", "5300"],
            &["j", "--forwarder-port", "5300"],
        ] {
            let m = cmd().try_get_matches_from(args).unwrap();
            let f = Flags::from_arg_matches(&m).unwrap();
            let c = merge(&f, None).unwrap();
            assert_eq!(c.forwarder_port, 5300, "{args:?}");
            assert_eq!(c.listen, 53, "{args:?}: not the listening port");
        }
    }

    #[test]
    fn the_help_shows_every_default() {
        use crate::config::{
            DEFAULT_BIND, DEFAULT_DELAY, DEFAULT_FORWARDER_PORT, DEFAULT_LISTEN, DEFAULT_LOG_LEVEL,
            DEFAULT_MAX_REMOVED_SHARE, DEFAULT_TTL, StopMode,
        };
        let cmd = Flags::augment_args(clap::Command::new("jitsu-dns"));
        let help = |key: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == key).unwrap();
            arg.get_help().map(|h| h.to_string()).unwrap_or_default()
        };
        // Those with a constant show the constant's value.
        for (key, default) in [
            ("bind", DEFAULT_BIND.to_string()),
            ("listen", DEFAULT_LISTEN.to_string()),
            ("forwarder_port", DEFAULT_FORWARDER_PORT.to_string()),
            ("delay", DEFAULT_DELAY.as_secs_f64().to_string()),
            ("ttl", DEFAULT_TTL.to_string()),
            ("mode", StopMode::Destroy.to_string()),
            ("log_level", DEFAULT_LOG_LEVEL.to_string()),
            ("max_removed_share", DEFAULT_MAX_REMOVED_SHARE.to_string()),
            (
                "connect",
                format!("process://{}", crate::backend::process::DEFAULT_RUNTIME_DIR),
            ),
        ] {
            assert!(
                help(key).contains(&format!("[default: {default}")),
                "{key}: {}",
                help(key)
            );
        }
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "specs") {
            let h = help(arg.get_id().as_str());
            assert!(h.contains("[default: "), "{}: {h}", arg.get_id());
        }
    }

    #[test]
    fn a_setting_is_placed_at_its_flag_or_its_line() {
        let flags = Flags {
            forwarder_port: Some("0".into()),
            ..Flags::default()
        };
        let e = merge(&flags, None).unwrap_err().to_string();
        assert!(
            e.starts_with("flag --forwarder-port: forwarder_port = \"0\": must be between 1"),
            "{e}"
        );
        let e = file_error("\nforwarder_port = 0\n");
        assert!(
            e.starts_with("j.toml line 2: forwarder_port = \"0\": must be between 1"),
            "{e}"
        );
        // A list where the flag takes a comma-separated one.
        let f = from_toml(
            "forwarder = [\"192.0.2.1\", \"192.0.2.2\"]\n",
            Path::new("j"),
        );
        let c = merge(&Flags::default(), Some(&f.unwrap())).unwrap();
        assert_eq!(
            c.forwarders,
            crate::config::Forwarders::List(vec![
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap()
            ])
        );
    }

    #[test]
    fn a_malformed_file_setting_is_refused_even_under_a_flag() {
        let file = from_toml("ttl = [[1]]\n", Path::new("j.toml")).unwrap();
        let flags = Flags {
            ttl: Some("10".into()),
            ..Flags::default()
        };
        let e = merge(&flags, Some(&file)).unwrap_err().to_string();
        assert!(
            e.starts_with("j.toml line 1: ttl = \"\": nested arrays and tables"),
            "{e}"
        );
        // A well-formed one the flag overrides is not looked at.
        let file = from_toml("ttl = \"never\"\n", Path::new("j.toml")).unwrap();
        assert_eq!(merge(&flags, Some(&file)).unwrap().ttl, 10);
    }
}
