//! `geoml wan-fault`: cut, heal, reset or delay links of a running WAN proxy.

use std::net::SocketAddr;

use clap::{Args, Subcommand};

use super::control::{self, ControlError};
use super::fault::{FaultOp, FaultState, Scope};

/// `geoml wan-fault`'s arguments.
#[derive(Args, Clone, Debug)]
pub struct WanFaultArgs {
    /// The proxy's control address: `geoml wan-proxy --control-listen`, which
    /// `geoml run` prints at start (`--wan-control` chooses it).
    #[arg(long, value_name = "ADDR")]
    pub control: SocketAddr,
    /// What to do.
    #[command(subcommand)]
    pub command: FaultCommand,
}

/// An operation on the links, or `status`.
#[derive(Subcommand, Clone, Debug)]
pub enum FaultCommand {
    /// Stop delivering bytes on the links: open connections stall and new
    /// ones reach nothing until a heal (a partition, not a refusal).
    Cut(ScopeArgs),
    /// Restore normal forwarding on the links: no cut, no extra delay; held
    /// bytes are delivered.
    Heal(ScopeArgs),
    /// Close every open connection crossing the links (both ends see a
    /// reset); new connections work as before.
    Reset(ScopeArgs),
    /// Add a one-way delay to the links on top of their latency.
    Delay {
        /// The links.
        #[command(flatten)]
        scope: ScopeArgs,
        /// Extra delay in milliseconds (0 removes it).
        #[arg(long)]
        ms: u64,
    },
    /// Print every link's state.
    Status,
}

/// Which links: exactly one of `--datacenter`, `--link` or `--all`.
#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// Every link to and from this datacenter.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// The directed link FROM→TO (bytes sent from FROM to TO).
    #[arg(long, value_name = "FROM,TO", value_parser = parse_link)]
    pub link: Option<(String, String)>,
    /// Every link.
    #[arg(long)]
    pub all: bool,
}

impl ScopeArgs {
    /// The scope these arguments name (clap's group makes it exactly one).
    #[must_use]
    pub fn scope(&self) -> Scope {
        match (&self.datacenter, &self.link) {
            (Some(name), _) => Scope::Datacenter(name.clone()),
            (None, Some((from, to))) => Scope::Link {
                from: from.clone(),
                to: to.clone(),
            },
            (None, None) => Scope::All,
        }
    }
}

/// Parses `FROM,TO`.
fn parse_link(text: &str) -> Result<(String, String), String> {
    match text.split_once(',') {
        Some((from, to)) if !from.is_empty() && !to.is_empty() && !to.contains(',') => {
            Ok((from.to_owned(), to.to_owned()))
        }
        _ => Err(format!("{text:?} is not FROM,TO (two datacenter names)")),
    }
}

impl FaultCommand {
    /// The operation, or `None` for `status`.
    #[must_use]
    pub fn op(&self) -> Option<FaultOp> {
        match self {
            Self::Cut(s) => Some(FaultOp::Cut { scope: s.scope() }),
            Self::Heal(s) => Some(FaultOp::Heal { scope: s.scope() }),
            Self::Reset(s) => Some(FaultOp::Reset { scope: s.scope() }),
            Self::Delay { scope, ms } => Some(FaultOp::Delay {
                scope: scope.scope(),
                ms: *ms,
            }),
            Self::Status => None,
        }
    }
}

/// Runs `geoml wan-fault`: applies the operation (or asks for the status)
/// and returns the state the proxy answers.
///
/// # Errors
///
/// See [`ControlError`].
pub async fn run(args: &WanFaultArgs) -> Result<FaultState, ControlError> {
    match args.command.op() {
        Some(op) => control::apply(args.control, &op).await,
        None => control::status(args.control).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WanFaultArgs,
    }

    fn parse(args: &[&str]) -> Result<WanFaultArgs, clap::Error> {
        Cli::try_parse_from(["geoml", "--control", "127.0.0.1:9"].iter().chain(args))
            .map(|c| c.args)
    }

    #[test]
    fn subcommands_name_the_documented_operations() {
        let op = |args: &[&str]| parse(args).unwrap().command.op();
        assert_eq!(
            op(&["cut", "--datacenter", "us-east"]),
            Some(FaultOp::Cut {
                scope: Scope::Datacenter("us-east".into())
            })
        );
        assert_eq!(
            op(&["delay", "--link", "a,b", "--ms", "200"]),
            Some(FaultOp::Delay {
                scope: Scope::Link {
                    from: "a".into(),
                    to: "b".into()
                },
                ms: 200
            })
        );
        assert_eq!(
            op(&["heal", "--all"]),
            Some(FaultOp::Heal { scope: Scope::All })
        );
        assert_eq!(op(&["status"]), None);
    }

    #[test]
    fn a_scope_is_exactly_one_of_datacenter_link_or_all() {
        assert!(parse(&["cut"]).is_err());
        assert!(parse(&["cut", "--all", "--datacenter", "a"]).is_err());
        let e = parse(&["reset", "--link", "a"]).unwrap_err().to_string();
        assert!(e.contains("\"a\" is not FROM,TO"), "{e}");
    }
}
