//! The command lines of the roles `geoml` runs, typed and defined once: the
//! runtime parses its CLI with these structs (`clap::Args`), and whoever
//! starts a role — the local launcher, the Cartel harness, the operator's
//! pod builder — writes its arguments with [`ParameterServerArgs::command_line`]
//! and friends, so the two sides cannot drift apart.
//!
//! Every struct here round-trips: parsing `to_args()` gives the struct back.
//! The defaults the roles fall back to are the constants below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::mode::CollaborativeMode;

/// Seed of the initial model, the data partitions and the data order when
/// a role is given none.
pub const DEFAULT_SEED: u64 = 42;

/// Environment variable a launcher (`geoml run`, `geoml compare`, the
/// Cartel harness) sets on every role it starts: its own process id. A role
/// whose parent is no longer that process (its launcher ended, even by
/// SIGKILL) exits, so nothing outlives its launcher.
pub const LAUNCHER_PID_ENV: &str = "GEOML_LAUNCHER_PID";

/// Clocks between evaluations of the model on held-out data.
pub const DEFAULT_EVAL_EVERY: u64 = 20;

/// How long a parameter server waits, once training stopped, for its
/// workers to leave and its mirrors to drain before it exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long `geoml registry --exit-when-finished` keeps answering once every
/// site finished, so that each reads that all are done.
pub const DEFAULT_EXIT_GRACE: Duration = Duration::from_secs(5);

/// How often a site whose stream ended asks the registry whether every site
/// finished.
pub const DEFAULT_FINISH_POLL: Duration = Duration::from_secs(1);

/// How long the registry may be unreachable before a finished site takes it
/// to have exited (which it does once every site finished).
pub const DEFAULT_REGISTRY_GRACE: Duration = Duration::from_secs(5);

/// How long a finished site waits for the others before failing.
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(3600);

/// `subcommand` followed by `args`.
fn command_line(subcommand: &str, args: Vec<String>) -> Vec<String> {
    std::iter::once(subcommand.to_owned()).chain(args).collect()
}

/// Appends `--flag=value`.
fn flag(out: &mut Vec<String>, name: &str, value: impl std::fmt::Display) {
    out.push(format!("--{name}={value}"));
}

/// Appends `--flag=value` if there is a value.
fn optional(out: &mut Vec<String>, name: &str, value: Option<impl std::fmt::Display>) {
    if let Some(value) = value {
        flag(out, name, value);
    }
}

/// Appends `--flag` if it is set.
fn switch(out: &mut Vec<String>, name: &str, on: bool) {
    if on {
        out.push(format!("--{name}"));
    }
}

/// Where data sets are cached.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct DataDirArgs {
    /// Where data sets are cached [default: $GEOML_CACHE_DIR/data or ~/.cache/geoml/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArgs {
    /// The arguments, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        optional(
            &mut out,
            "data-dir",
            self.data_dir.as_ref().map(|p| p.display()),
        );
        out
    }
}

/// Where a Kubernetes `kubernetes.io/tls` Secret is mounted in a role's pod,
/// and so where a role looks for its TLS material unless told otherwise.
pub const DEFAULT_TLS_DIR: &str = "/etc/geoml/tls";

/// How a role's gRPC services and clients are secured: mutual TLS with the
/// job's CA (the default), or plaintext when explicitly asked for.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// A directory holding the job's CA (`ca.crt`) and this role's
    /// certificate and key (`tls.crt`, `tls.key`), as a `kubernetes.io/tls`
    /// Secret is mounted: servers require client certificates of that CA,
    /// clients present theirs [default: /etc/geoml/tls].
    #[arg(long, value_name = "DIR", conflicts_with = "insecure_plaintext")]
    pub tls_dir: Option<PathBuf>,
    /// Serve and call without TLS: anyone who reaches a port is trusted,
    /// and peers are who they say they are. Logged loudly.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// Mutual TLS with the material in `dir`.
    #[must_use]
    pub fn mtls(dir: PathBuf) -> Self {
        Self {
            tls_dir: Some(dir),
            insecure_plaintext: false,
        }
    }

    /// Plaintext: the explicit opt-out of TLS.
    #[must_use]
    pub fn insecure_plaintext() -> Self {
        Self {
            tls_dir: None,
            insecure_plaintext: true,
        }
    }

    /// The TLS directory, or `None` for plaintext.
    #[must_use]
    pub fn dir(&self) -> Option<PathBuf> {
        (!self.insecure_plaintext).then(|| {
            self.tls_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_DIR))
        })
    }

    /// The arguments, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        optional(
            &mut out,
            "tls-dir",
            self.tls_dir.as_ref().map(|p| p.display()),
        );
        switch(&mut out, "insecure-plaintext", self.insecure_plaintext);
        out
    }
}

/// What every role of a job with parameter servers takes: the job, its
/// datacenter's topology, the seed, metrics and data.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct JobRoleArgs {
    /// The manifest holding the TrainingJob, its SyncPolicy and Datacenters.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The topology file of this role's datacenter: its shards and mirrors.
    #[arg(long)]
    pub topology: PathBuf,
    /// Seed of the initial model and the data order.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where data sets are cached.
    #[command(flatten)]
    pub data: DataDirArgs,
    /// Never fetch: a data set missing from --data-dir is an error (fill the
    /// directory with `geoml data fetch`; see docs/data.md).
    #[arg(long)]
    pub no_fetch: bool,
    /// mTLS material, or the plaintext opt-out.
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl JobRoleArgs {
    /// The role arguments of `manifest` and `topology` with every default.
    #[must_use]
    pub fn new(manifest: PathBuf, topology: PathBuf) -> Self {
        Self {
            manifest,
            topology,
            seed: DEFAULT_SEED,
            metrics_listen: None,
            data: DataDirArgs::default(),
            no_fetch: false,
            tls: TlsArgs::default(),
        }
    }

    /// The arguments, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "manifest", self.manifest.display());
        flag(&mut out, "topology", self.topology.display());
        flag(&mut out, "seed", self.seed);
        optional(&mut out, "metrics-listen", self.metrics_listen);
        out.extend(self.data.to_args());
        switch(&mut out, "no-fetch", self.no_fetch);
        out.extend(self.tls.to_args());
        out
    }
}

/// `geoml ps`: one parameter-server shard.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ParameterServerArgs {
    /// Index of this shard within its datacenter.
    #[arg(long)]
    pub shard: u32,
    /// Address to serve gRPC on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Keep checkpoints and the write-ahead log here, and restore from them.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep serving after training is done, until SIGTERM (`geoml run` reads
    /// final statuses this way). Without it the shard exits 0 on its own once
    /// training stopped, every worker left and its mirrors drained.
    #[arg(long)]
    pub keep_serving: bool,
    /// Once training stopped, seconds to wait for every worker to leave and
    /// every update to reach the mirrors before exiting anyway.
    #[arg(long, default_value_t = DEFAULT_DRAIN_TIMEOUT.as_secs())]
    pub drain_timeout: u64,
    /// On a clean exit, write the final values of the series the operator
    /// reads for progress (Prometheus text) to this file: the pod's
    /// termination message, read once the pod can no longer be scraped.
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
    /// The job, topology, seed, metrics and data of the role.
    #[command(flatten)]
    pub role: JobRoleArgs,
}

impl ParameterServerArgs {
    /// The subcommand.
    pub const SUBCOMMAND: &'static str = "ps";

    /// Shard `shard` serving on `listen`, with every default.
    #[must_use]
    pub fn new(shard: u32, listen: SocketAddr, role: JobRoleArgs) -> Self {
        Self {
            shard,
            listen,
            checkpoint_dir: None,
            keep_serving: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT.as_secs(),
            termination_log: None,
            role,
        }
    }

    /// The arguments after the subcommand, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "shard", self.shard);
        flag(&mut out, "listen", self.listen);
        optional(
            &mut out,
            "checkpoint-dir",
            self.checkpoint_dir.as_ref().map(|p| p.display()),
        );
        switch(&mut out, "keep-serving", self.keep_serving);
        flag(&mut out, "drain-timeout", self.drain_timeout);
        optional(
            &mut out,
            "termination-log",
            self.termination_log.as_ref().map(|p| p.display()),
        );
        out.extend(self.role.to_args());
        out
    }

    /// `geoml`'s whole argument list: the subcommand, then [`Self::to_args`].
    #[must_use]
    pub fn command_line(&self) -> Vec<String> {
        command_line(Self::SUBCOMMAND, self.to_args())
    }
}

/// `geoml worker`: one worker.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct WorkerArgs {
    /// Index of this worker within its datacenter.
    #[arg(long)]
    pub index: u32,
    /// Evaluate every this many clocks (worker 0; with mirrors and a target
    /// the datacenters take turns until one met it).
    #[arg(long, default_value_t = DEFAULT_EVAL_EVERY, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: u64,
    /// The job, topology, seed, metrics and data of the role.
    #[command(flatten)]
    pub role: JobRoleArgs,
}

impl WorkerArgs {
    /// The subcommand.
    pub const SUBCOMMAND: &'static str = "worker";

    /// The arguments after the subcommand, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "index", self.index);
        flag(&mut out, "eval-every", self.eval_every);
        out.extend(self.role.to_args());
        out
    }

    /// `geoml`'s whole argument list: the subcommand, then [`Self::to_args`].
    #[must_use]
    pub fn command_line(&self) -> Vec<String> {
        command_line(Self::SUBCOMMAND, self.to_args())
    }
}

/// `geoml registry`: Cartel's metadata service.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct RegistryArgs {
    /// Address to serve gRPC on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Keep the registry's state here; a restarted registry reloads it.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// gRPC URLs of registry replicas to forward every update to, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Exit 0 on its own once this many distinct sites (the job's
    /// datacenters) said their stream ended, after --exit-grace. Without it
    /// the registry serves until SIGTERM.
    #[arg(long, value_name = "SITES")]
    pub exit_when_finished: Option<usize>,
    /// With --exit-when-finished: seconds to keep answering once every site
    /// finished, so that each reads that all are done.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_EXIT_GRACE.as_secs_f64())]
    pub exit_grace: f64,
    /// mTLS material, or the plaintext opt-out.
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl RegistryArgs {
    /// The subcommand.
    pub const SUBCOMMAND: &'static str = "registry";

    /// A registry serving on `listen`, with every default.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            state_dir: None,
            replicas: Vec::new(),
            exit_when_finished: None,
            exit_grace: DEFAULT_EXIT_GRACE.as_secs_f64(),
            tls: TlsArgs::default(),
        }
    }

    /// The arguments after the subcommand, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "listen", self.listen);
        optional(
            &mut out,
            "state-dir",
            self.state_dir.as_ref().map(|p| p.display()),
        );
        if !self.replicas.is_empty() {
            flag(&mut out, "replicas", self.replicas.join(","));
        }
        optional(&mut out, "exit-when-finished", self.exit_when_finished);
        flag(&mut out, "exit-grace", self.exit_grace);
        out.extend(self.tls.to_args());
        out
    }

    /// `geoml`'s whole argument list: the subcommand, then [`Self::to_args`].
    #[must_use]
    pub fn command_line(&self) -> Vec<String> {
        command_line(Self::SUBCOMMAND, self.to_args())
    }
}

/// `geoml site`: one site of a Collaborative job.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct SiteArgs {
    /// The manifest holding the TrainingJob.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Where data sets are cached.
    #[command(flatten)]
    pub data: DataDirArgs,
    /// Never fetch: a data set missing from --data-dir is an error (fill the
    /// directory with `geoml data fetch`; see docs/data.md).
    #[arg(long)]
    pub no_fetch: bool,
    /// The topology file; gives the site (its datacenter) and the registry URL.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// The site: a datacenter of the job [default: the topology's datacenter].
    #[arg(long)]
    pub site: Option<String>,
    /// Address to serve the model exchange on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// URL other sites reach this site at, e.g. through a WAN proxy [default: http://LISTEN].
    #[arg(long)]
    pub advertise: Option<String>,
    /// The registry's gRPC URL [default: the topology's registry].
    #[arg(long)]
    pub registry: Option<String>,
    /// `cartel` (borrow from neighbours on drift) or `isolated`.
    #[arg(long, value_enum, default_value = "cartel")]
    pub mode: CollaborativeMode,
    /// Detect drift with ADWIN instead of the window W / limit L rule.
    #[arg(long)]
    pub adwin: bool,
    /// Start training only once the registry knows this many sites (the
    /// job's datacenters); after the stream, wait for this many to finish
    /// [default 0: start at once, and wait for every site the registry knows].
    #[arg(long, default_value_t = 0)]
    pub expect_sites: usize,
    /// Write the site's report (JSON) here when its stream ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Once the stream ended: seconds between asking the registry whether
    /// every site finished.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_FINISH_POLL.as_secs_f64())]
    pub finish_poll: f64,
    /// Once the stream ended: seconds the registry may be unreachable before
    /// the site takes it to have exited (it does once every site finished)
    /// and exits 0.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_REGISTRY_GRACE.as_secs_f64())]
    pub registry_grace: f64,
    /// Once the stream ended: seconds to wait for every site to finish
    /// before failing.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_FINISH_TIMEOUT.as_secs_f64())]
    pub finish_timeout: f64,
    /// mTLS material, or the plaintext opt-out.
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl SiteArgs {
    /// The subcommand.
    pub const SUBCOMMAND: &'static str = "site";

    /// A site of the job in `manifest` serving on `listen`, in `mode`, with
    /// every default.
    #[must_use]
    pub fn new(manifest: PathBuf, listen: SocketAddr, mode: CollaborativeMode) -> Self {
        Self {
            manifest,
            data: DataDirArgs::default(),
            no_fetch: false,
            topology: None,
            site: None,
            listen,
            advertise: None,
            registry: None,
            mode,
            adwin: false,
            expect_sites: 0,
            report: None,
            finish_poll: DEFAULT_FINISH_POLL.as_secs_f64(),
            registry_grace: DEFAULT_REGISTRY_GRACE.as_secs_f64(),
            finish_timeout: DEFAULT_FINISH_TIMEOUT.as_secs_f64(),
            tls: TlsArgs::default(),
        }
    }

    /// The arguments after the subcommand, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "manifest", self.manifest.display());
        out.extend(self.data.to_args());
        switch(&mut out, "no-fetch", self.no_fetch);
        optional(
            &mut out,
            "topology",
            self.topology.as_ref().map(|p| p.display()),
        );
        optional(&mut out, "site", self.site.as_ref());
        flag(&mut out, "listen", self.listen);
        optional(&mut out, "advertise", self.advertise.as_ref());
        optional(&mut out, "registry", self.registry.as_ref());
        flag(&mut out, "mode", self.mode.name());
        switch(&mut out, "adwin", self.adwin);
        flag(&mut out, "expect-sites", self.expect_sites);
        optional(
            &mut out,
            "report",
            self.report.as_ref().map(|p| p.display()),
        );
        flag(&mut out, "finish-poll", self.finish_poll);
        flag(&mut out, "registry-grace", self.registry_grace);
        flag(&mut out, "finish-timeout", self.finish_timeout);
        out.extend(self.tls.to_args());
        out
    }

    /// `geoml`'s whole argument list: the subcommand, then [`Self::to_args`].
    #[must_use]
    pub fn command_line(&self) -> Vec<String> {
        command_line(Self::SUBCOMMAND, self.to_args())
    }
}

/// `geoml wan-proxy`: the WAN emulator between datacenters.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct WanProxyArgs {
    /// The links and routes (YAML; see `geoml_launcher::wan::WanConfig`).
    #[arg(long)]
    pub config: PathBuf,
    /// Serve Prometheus metrics (bytes and faults per link) at
    /// http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the fault API at http://ADDR/faults (a loopback address): GET
    /// for every link's state, POST a JSON operation to cut, heal, reset or
    /// delay links (`geoml wan-fault` is its client). None when absent.
    #[arg(long)]
    pub control_listen: Option<SocketAddr>,
}

impl WanProxyArgs {
    /// The subcommand.
    pub const SUBCOMMAND: &'static str = "wan-proxy";

    /// The arguments after the subcommand, as [`Self`] parses them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        flag(&mut out, "config", self.config.display());
        optional(&mut out, "metrics-listen", self.metrics_listen);
        optional(&mut out, "control-listen", self.control_listen);
        out
    }

    /// `geoml`'s whole argument list: the subcommand, then [`Self::to_args`].
    #[must_use]
    pub fn command_line(&self) -> Vec<String> {
        command_line(Self::SUBCOMMAND, self.to_args())
    }
}

#[cfg(test)]
mod tests {
    use clap::{FromArgMatches, Parser};

    use super::*;

    /// Parses `args` (after the subcommand) as `T`.
    fn parse<T: Args + FromArgMatches>(args: Vec<String>) -> T {
        #[derive(Parser)]
        struct Cli<T: Args> {
            #[command(flatten)]
            inner: T,
        }
        let command_line = std::iter::once("geoml".to_owned()).chain(args);
        Cli::<T>::try_parse_from(command_line)
            .unwrap_or_else(|e| panic!("{e}"))
            .inner
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn role() -> JobRoleArgs {
        JobRoleArgs {
            manifest: "/m/job.yaml".into(),
            topology: "/m/topology-ewr.yaml".into(),
            seed: 7,
            metrics_listen: Some(addr(9100)),
            data: DataDirArgs {
                data_dir: Some("/data".into()),
            },
            no_fetch: true,
            tls: TlsArgs::mtls("/tls".into()),
        }
    }

    #[test]
    fn tls_round_trips_and_defaults_to_mtls() {
        for tls in [
            TlsArgs::default(),
            TlsArgs::mtls("/secret".into()),
            TlsArgs::insecure_plaintext(),
        ] {
            assert_eq!(parse::<TlsArgs>(tls.to_args()), tls);
        }
        assert_eq!(
            TlsArgs::default().dir(),
            Some(PathBuf::from(DEFAULT_TLS_DIR))
        );
        assert_eq!(TlsArgs::insecure_plaintext().dir(), None);
    }

    #[test]
    fn parameter_server_round_trips() {
        let defaults =
            ParameterServerArgs::new(0, addr(7070), JobRoleArgs::new("m".into(), "t".into()));
        assert_eq!(parse::<ParameterServerArgs>(defaults.to_args()), defaults);
        let all = ParameterServerArgs {
            shard: 3,
            listen: addr(7071),
            checkpoint_dir: Some("/ckpt".into()),
            keep_serving: true,
            drain_timeout: 9,
            termination_log: Some("/dev/termination-log".into()),
            role: role(),
        };
        assert_eq!(parse::<ParameterServerArgs>(all.to_args()), all);
        assert_eq!(all.command_line()[0], "ps");
    }

    #[test]
    fn worker_round_trips() {
        let worker = WorkerArgs {
            index: 2,
            eval_every: 5,
            role: role(),
        };
        assert_eq!(parse::<WorkerArgs>(worker.to_args()), worker);
        let defaults = WorkerArgs {
            index: 0,
            eval_every: DEFAULT_EVAL_EVERY,
            role: JobRoleArgs::new("m".into(), "t".into()),
        };
        assert_eq!(parse::<WorkerArgs>(defaults.to_args()), defaults);
    }

    #[test]
    fn registry_round_trips() {
        let defaults = RegistryArgs::new(addr(7000));
        assert_eq!(parse::<RegistryArgs>(defaults.to_args()), defaults);
        let all = RegistryArgs {
            listen: addr(7001),
            state_dir: Some("/state".into()),
            replicas: vec!["http://a:1".into(), "http://b:2".into()],
            exit_when_finished: Some(3),
            exit_grace: 0.25,
            tls: TlsArgs::insecure_plaintext(),
        };
        assert_eq!(parse::<RegistryArgs>(all.to_args()), all);
    }

    #[test]
    fn site_round_trips() {
        let defaults = SiteArgs::new("/m.yaml".into(), addr(7100), CollaborativeMode::Cartel);
        assert_eq!(parse::<SiteArgs>(defaults.to_args()), defaults);
        let all = SiteArgs {
            manifest: "/m.yaml".into(),
            data: DataDirArgs {
                data_dir: Some("/data".into()),
            },
            no_fetch: true,
            topology: Some("/t.yaml".into()),
            site: Some("ewr".into()),
            listen: addr(7101),
            advertise: Some("http://proxy:1".into()),
            registry: Some("http://registry:7000".into()),
            mode: CollaborativeMode::Isolated,
            adwin: true,
            expect_sites: 3,
            report: Some("/r.json".into()),
            finish_poll: 0.2,
            registry_grace: 1.5,
            finish_timeout: 60.0,
            tls: TlsArgs::mtls("/tls".into()),
        };
        assert_eq!(parse::<SiteArgs>(all.to_args()), all);
    }

    #[test]
    fn wan_proxy_round_trips() {
        let proxy = WanProxyArgs {
            config: "/w/wan.yaml".into(),
            metrics_listen: Some(addr(9200)),
            control_listen: Some(addr(9201)),
        };
        assert_eq!(parse::<WanProxyArgs>(proxy.to_args()), proxy);
        let bare = WanProxyArgs {
            config: "/w/wan.yaml".into(),
            metrics_listen: None,
            control_listen: None,
        };
        assert_eq!(parse::<WanProxyArgs>(bare.to_args()), bare);
    }
}
