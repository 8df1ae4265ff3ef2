//! Faults of the emulated WAN, defined once for the proxy, its control client and `geoml run --fault`.
//!
//! A [`FaultOp`] (cut, heal, reset, delay) applies to a [`Scope`]: one
//! directed link, every link to and from a datacenter, or every link. The
//! proxy answers each operation with the [`FaultState`] of every link. A
//! [`ScheduledFault`] is an operation at a time after the start of a run,
//! parsed from `geoml run --fault SPEC`.
//!
//! What a cut looks like to TCP clients: like a partition that drops
//! packets, not like a refusal. Bytes on an open connection stop arriving
//! (the sender's buffers fill and its writes block) and are delivered once
//! the link heals, as TCP retransmits them after a real partition; a new
//! connection is accepted by the proxy (it listens on this machine) but
//! reaches its target only after the heal, so the client's first request
//! stalls until then and a client with a deadline sees it expire. Nothing
//! is refused or closed by a cut; [`FaultOp::Reset`] closes connections.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an operation applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Scope {
    /// The directed link `from → to`: bytes sent from datacenter `from` to
    /// datacenter `to`.
    Link {
        /// Sending datacenter.
        from: String,
        /// Receiving datacenter.
        to: String,
    },
    /// Every link to and from this datacenter.
    Datacenter(String),
    /// Every link.
    All,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Link { from, to } => write!(f, "link {from}→{to}"),
            Self::Datacenter(name) => write!(f, "datacenter {name}"),
            Self::All => f.write_str("every link"),
        }
    }
}

/// An operation on the emulated WAN; its JSON form is what `POST /faults`
/// takes, e.g. `{"op":"cut","scope":{"datacenter":"us-east"}}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum FaultOp {
    /// Stop delivering bytes on the links (a partition; see the module docs).
    Cut {
        /// The links.
        scope: Scope,
    },
    /// Restore normal forwarding on the links: no cut, no extra delay.
    Heal {
        /// The links.
        scope: Scope,
    },
    /// Close every open connection that crosses one of the links; both of
    /// its ends see a reset (or EOF). New connections work as before.
    Reset {
        /// The links.
        scope: Scope,
    },
    /// Delay every byte on the links by `ms` milliseconds on top of their
    /// latency (0 removes the extra delay).
    Delay {
        /// The links.
        scope: Scope,
        /// Extra one-way delay in milliseconds.
        ms: u64,
    },
}

impl FaultOp {
    /// The links the operation applies to.
    #[must_use]
    pub fn scope(&self) -> &Scope {
        match self {
            Self::Cut { scope }
            | Self::Heal { scope }
            | Self::Reset { scope }
            | Self::Delay { scope, .. } => scope,
        }
    }

    /// The operation's name, as in its JSON `op` field and the
    /// `geoml_wan_faults_total` label.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cut { .. } => "cut",
            Self::Heal { .. } => "heal",
            Self::Reset { .. } => "reset",
            Self::Delay { .. } => "delay",
        }
    }

    /// The fault of a link once the operation applied to it (a reset leaves
    /// it as it was).
    #[must_use]
    pub fn apply(&self, fault: LinkFault) -> LinkFault {
        match self {
            Self::Cut { .. } => LinkFault { cut: true, ..fault },
            Self::Heal { .. } => LinkFault::default(),
            Self::Reset { .. } => fault,
            Self::Delay { ms, .. } => LinkFault {
                extra_delay_ms: *ms,
                ..fault
            },
        }
    }
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Delay { scope, ms } => write!(f, "delay {scope} by {ms} ms"),
            op => write!(f, "{} {}", op.name(), op.scope()),
        }
    }
}

/// The fault of one directed link.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LinkFault {
    /// No byte is delivered until a heal.
    pub cut: bool,
    /// Extra one-way delay in milliseconds.
    pub extra_delay_ms: u64,
}

/// The state of one directed link, as the proxy reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LinkState {
    /// Sending datacenter.
    pub from: String,
    /// Receiving datacenter.
    pub to: String,
    /// Its fault.
    #[serde(flatten)]
    pub fault: LinkFault,
    /// Open connections crossing the link (in either direction of their
    /// bytes: a connection crosses `a → b` and `b → a`).
    pub connections: usize,
}

/// Every link's state: the answer to every control request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FaultState {
    /// The links, ordered by `from` then `to`.
    pub links: Vec<LinkState>,
}

impl FaultState {
    /// The state of link `from → to`.
    #[must_use]
    pub fn link(&self, from: &str, to: &str) -> Option<&LinkState> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }
}

/// Why a fault request or a `--fault` spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// No link starts or ends at the datacenter.
    #[error("unknown datacenter {0:?} (the WAN links {1})")]
    UnknownDatacenter(String, String),
    /// The link is not configured.
    #[error("unknown link {from}→{to} (the WAN links {known})")]
    UnknownLink {
        /// Sending datacenter.
        from: String,
        /// Receiving datacenter.
        to: String,
        /// The datacenters there are.
        known: String,
    },
    /// The fault API may only listen on a loopback address.
    #[error("the WAN fault API listens on loopback addresses only, not {0}")]
    NotLoopback(std::net::SocketAddr),
    /// The request body is not a [`FaultOp`].
    #[error("malformed fault request: {0}")]
    Malformed(String),
    /// A `--fault` spec does not parse.
    #[error(
        "--fault {spec:?}: {reason} (expected OP:SCOPE@START[+DURATION], e.g. cut:us-east@20s+60s)"
    )]
    Spec {
        /// The spec.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The indexes into `links` of the links `scope` names.
///
/// # Errors
///
/// [`FaultError::UnknownDatacenter`] or [`FaultError::UnknownLink`] when
/// the scope names something the links do not have.
pub fn resolve(scope: &Scope, links: &[(String, String)]) -> Result<Vec<usize>, FaultError> {
    let known = || {
        let mut names: Vec<&str> = links
            .iter()
            .flat_map(|(a, b)| [a.as_str(), b.as_str()])
            .collect();
        names.sort_unstable();
        names.dedup();
        names.join(", ")
    };
    let chosen: Vec<usize> = match scope {
        Scope::All => (0..links.len()).collect(),
        Scope::Datacenter(name) => {
            let chosen: Vec<usize> = (0..links.len())
                .filter(|&i| &links[i].0 == name || &links[i].1 == name)
                .collect();
            if chosen.is_empty() {
                return Err(FaultError::UnknownDatacenter(name.clone(), known()));
            }
            chosen
        }
        Scope::Link { from, to } => {
            let Some(i) = links.iter().position(|(a, b)| a == from && b == to) else {
                return Err(FaultError::UnknownLink {
                    from: from.clone(),
                    to: to.clone(),
                    known: known(),
                });
            };
            vec![i]
        }
    };
    Ok(chosen)
}

/// A fault `geoml run --fault` applies at a time after the WAN proxy
/// starts, and heals after a while if it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledFault {
    /// The operation.
    pub op: FaultOp,
    /// When, after the proxy starts.
    pub at: Duration,
    /// How long until a heal of the same scope, if any.
    pub lasts: Option<Duration>,
}

impl ScheduledFault {
    /// Every operation of `faults` with its time, in time order (a lasting
    /// fault gives two: itself and its heal).
    #[must_use]
    pub fn timeline(faults: &[Self]) -> Vec<(Duration, FaultOp)> {
        let mut events = Vec::new();
        for fault in faults {
            events.push((fault.at, fault.op.clone()));
            if let Some(lasts) = fault.lasts {
                events.push((
                    fault.at + lasts,
                    FaultOp::Heal {
                        scope: fault.op.scope().clone(),
                    },
                ));
            }
        }
        events.sort_by_key(|(at, _)| *at);
        events
    }
}

/// Parses `OP:SCOPE@START[+DURATION]`:
///
/// - OP: `cut`, `reset` or `delay=MS` (extra milliseconds);
/// - SCOPE: a datacenter (`us-east`), a directed link (`us-east,eu-west`)
///   or `all`;
/// - START: when, after the WAN proxy starts (`20s`, `500ms`, `2m`);
/// - DURATION: heal the scope this long after START (not for `reset`).
impl FromStr for ScheduledFault {
    type Err = FaultError;

    fn from_str(spec: &str) -> Result<Self, FaultError> {
        let fail = |reason: String| FaultError::Spec {
            spec: spec.to_owned(),
            reason,
        };
        let (op, rest) = spec
            .split_once(':')
            .ok_or_else(|| fail("no ':' after the operation".to_owned()))?;
        let (scope, when) = rest
            .split_once('@')
            .ok_or_else(|| fail("no '@' before the start time".to_owned()))?;
        let (start, lasts) = match when.split_once('+') {
            Some((start, lasts)) => (start, Some(lasts)),
            None => (when, None),
        };
        let scope = match scope.split_once(',') {
            _ if scope == "all" => Scope::All,
            Some((from, to)) if !from.is_empty() && !to.is_empty() && !to.contains(',') => {
                Scope::Link {
                    from: from.to_owned(),
                    to: to.to_owned(),
                }
            }
            None if !scope.is_empty() => Scope::Datacenter(scope.to_owned()),
            _ => {
                return Err(fail(format!(
                    "scope {scope:?} is not a datacenter, FROM,TO or all"
                )));
            }
        };
        let op = match op.split_once('=') {
            None if op == "cut" => FaultOp::Cut { scope },
            None if op == "reset" => FaultOp::Reset { scope },
            Some(("delay", ms)) => FaultOp::Delay {
                scope,
                ms: ms
                    .parse()
                    .map_err(|_| fail(format!("delay {ms:?} is not whole milliseconds")))?,
            },
            _ => {
                return Err(fail(format!(
                    "operation {op:?} is not cut, reset or delay=MS"
                )));
            }
        };
        let at = duration(start).map_err(|e| fail(format!("start {start:?}: {e}")))?;
        let lasts = lasts
            .map(|l| duration(l).map_err(|e| fail(format!("duration {l:?}: {e}"))))
            .transpose()?;
        if lasts.is_some() && matches!(op, FaultOp::Reset { .. }) {
            return Err(fail("a reset is instant and takes no +DURATION".to_owned()));
        }
        Ok(Self { op, at, lasts })
    }
}

/// Parses `20s`, `500ms` or `2m`.
fn duration(text: &str) -> Result<Duration, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let value: u64 = digits
        .parse()
        .map_err(|_| "expected a whole number and a unit: 500ms, 20s or 2m".to_owned())?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value.saturating_mul(60))),
        _ => Err(format!("unit {unit:?} is not ms, s or m")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)] // test code
mod tests {
    use super::*;

    fn links() -> Vec<(String, String)> {
        let names = ["a", "b", "c"];
        let mut links = Vec::new();
        for x in names {
            for y in names {
                if x != y {
                    links.push((x.to_owned(), y.to_owned()));
                }
            }
        }
        links
    }

    #[test]
    fn a_datacenter_is_every_link_to_and_from_it() {
        let links = links();
        let chosen = resolve(&Scope::Datacenter("a".into()), &links).unwrap();
        let named: Vec<_> = chosen.iter().map(|&i| links[i].clone()).collect();
        assert_eq!(named.len(), 4);
        assert!(named.iter().all(|(x, y)| x == "a" || y == "a"));
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let links = links();
        let e = resolve(&Scope::Datacenter("z".into()), &links).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown datacenter \"z\" (the WAN links a, b, c)"
        );
        let e = resolve(
            &Scope::Link {
                from: "a".into(),
                to: "a".into(),
            },
            &links,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("unknown link a→a"), "{e}");
    }

    #[test]
    fn operations_read_and_write_the_documented_json() {
        let op: FaultOp =
            serde_json::from_str(r#"{"op":"cut","scope":{"datacenter":"us-east"}}"#).unwrap();
        assert_eq!(
            op,
            FaultOp::Cut {
                scope: Scope::Datacenter("us-east".into())
            }
        );
        let delay = FaultOp::Delay {
            scope: Scope::Link {
                from: "a".into(),
                to: "b".into(),
            },
            ms: 200,
        };
        assert_eq!(
            serde_json::to_string(&delay).unwrap(),
            r#"{"op":"delay","scope":{"link":{"from":"a","to":"b"}},"ms":200}"#
        );
        assert_eq!(
            serde_json::to_string(&FaultOp::Heal { scope: Scope::All }).unwrap(),
            r#"{"op":"heal","scope":"all"}"#
        );
        assert!(serde_json::from_str::<FaultOp>(r#"{"op":"cut","scope":"all","x":1}"#).is_err());
        assert!(serde_json::from_str::<FaultOp>(r#"{"op":"melt","scope":"all"}"#).is_err());
    }

    #[test]
    fn heal_clears_cut_and_delay_and_reset_changes_nothing() {
        let scope = Scope::All;
        let faulty = FaultOp::Delay {
            scope: scope.clone(),
            ms: 5,
        }
        .apply(
            FaultOp::Cut {
                scope: scope.clone(),
            }
            .apply(LinkFault::default()),
        );
        assert_eq!(
            faulty,
            LinkFault {
                cut: true,
                extra_delay_ms: 5
            }
        );
        assert_eq!(
            FaultOp::Reset {
                scope: scope.clone()
            }
            .apply(faulty),
            faulty
        );
        assert_eq!(FaultOp::Heal { scope }.apply(faulty), LinkFault::default());
    }

    #[test]
    fn parses_the_demo_schedule() {
        let fault: ScheduledFault = "cut:us-east@20s+60s".parse().unwrap();
        assert_eq!(
            fault,
            ScheduledFault {
                op: FaultOp::Cut {
                    scope: Scope::Datacenter("us-east".into())
                },
                at: Duration::from_secs(20),
                lasts: Some(Duration::from_secs(60)),
            }
        );
        let delay: ScheduledFault = "delay=200:a,b@500ms".parse().unwrap();
        assert_eq!(
            delay.op,
            FaultOp::Delay {
                scope: Scope::Link {
                    from: "a".into(),
                    to: "b".into()
                },
                ms: 200
            }
        );
        assert_eq!(delay.at, Duration::from_millis(500));
        assert_eq!(delay.lasts, None);
        let all: ScheduledFault = "reset:all@2m".parse().unwrap();
        assert_eq!(all.op, FaultOp::Reset { scope: Scope::All });
        assert_eq!(all.at, Duration::from_secs(120));
    }

    #[test]
    fn spec_errors_name_what_is_wrong() {
        let error = |spec: &str| spec.parse::<ScheduledFault>().unwrap_err().to_string();
        assert!(error("cut:us-east").contains("no '@' before the start time"));
        assert!(error("melt:us-east@1s").contains("operation \"melt\""));
        assert!(error("cut:us-east@20x").contains("start \"20x\": unit \"x\""));
        assert!(error("cut:us-east@s").contains("start \"s\": expected a whole number"));
        assert!(error("cut:us-east@1s+y").contains("duration \"y\""));
        assert!(error("reset:us-east@1s+5s").contains("takes no +DURATION"));
        assert!(error("cut:a,b,c@1s").contains("scope \"a,b,c\""));
        assert!(error("delay=x:a@1s").contains("delay \"x\""));
        assert!(error("cut:us-east@20x").starts_with("--fault \"cut:us-east@20x\": "));
    }

    #[test]
    fn a_lasting_fault_heals_its_scope_later() {
        let faults: Vec<ScheduledFault> = ["cut:a@20s+60s", "reset:b@30s"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let timeline: Vec<(u64, String)> = ScheduledFault::timeline(&faults)
            .into_iter()
            .map(|(at, op)| (at.as_secs(), op.to_string()))
            .collect();
        assert_eq!(
            timeline,
            [
                (20, "cut datacenter a".to_owned()),
                (30, "reset datacenter b".to_owned()),
                (80, "heal datacenter a".to_owned()),
            ]
        );
    }
}
