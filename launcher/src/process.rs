//! Supervision of the `geoml` role processes a local run starts: one place
//! that spawns them (logs in `work_dir/logs/<name>.log`, appended, so a
//! restarted role keeps its history), gives them their TLS material (a
//! throwaway CA per supervisor, one certificate per role in
//! `work_dir/tls/<name>/`), watches them, stops them with SIGTERM and
//! reports a failure with the end of its log. `geoml run` and the Cartel
//! harness both use it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use std::sync::Arc;

use geoml_crds::identity::{Identity, Role};
use geoml_crds::pki::{CertificateAuthority, PkiError};
use geoml_crds::roles::{LAUNCHER_PID_ENV, TlsArgs};
use geoml_dataplane::tls::{TlsError, Transport};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How long a role may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of a failed role's log its error carries.
const LOG_TAIL_LINES: usize = 20;

/// What can go wrong with a role process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A process could not be started, watched or its log opened.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A process failed; carries the end of its log.
    #[error("{role} exited with {status}; last log lines:\n{log}")]
    Failed {
        /// `lan-ps-0`, `cartel-site-ewr`, ...
        role: String,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// The run's CA could not issue a role's certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The launcher's own certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A process did not exit within [`STOP_TIMEOUT`] of SIGTERM.
    #[error("stopping {role}: did not stop within {} s of SIGTERM", STOP_TIMEOUT.as_secs())]
    StopTimeout {
        /// The role.
        role: String,
    },
}

/// `ProcessError::Io` while doing `context`.
pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProcessError {
    let context = context.into();
    move |source| ProcessError::Io { context, source }
}

/// A loopback port nobody listens on, for a role to bind. The kernel may
/// hand out a port again once its listener here is closed, so ports given
/// out before are skipped: every role of every run in this process gets
/// its own.
pub fn unused_port() -> Result<u16, ProcessError> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Hold every candidate until one is new, so the kernel offers another.
    let mut held = Vec::new();
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io("finding a free port"))?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
        held.push(listener);
    }
}

/// The last lines of the log at `path` (empty if it cannot be read).
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Starts `geoml` role processes with their logs in one directory, and
/// issues their certificates.
#[derive(Clone, Debug)]
pub struct Supervisor {
    geoml: PathBuf,
    logs: PathBuf,
    /// The CA and where role certificates go; `None` for plaintext.
    ca: Option<Arc<(CertificateAuthority, PathBuf)>>,
    /// How the launcher itself calls the roles.
    transport: Transport,
}

/// A started role process.
#[derive(Debug)]
pub struct Process {
    /// `lan-ps-0`, `wan-proxy`, `cartel-registry`, ...
    pub name: String,
    /// Its command line after `geoml`.
    pub args: Vec<String>,
    /// The process.
    pub child: Child,
    log: PathBuf,
}

impl Supervisor {
    /// Roles are `geoml` (this binary path) and log to `work_dir/logs`,
    /// which is created. Unless `insecure_plaintext`, a new CA issues each
    /// role a certificate under `work_dir/tls`, and one for the launcher.
    pub fn new(
        geoml: &Path,
        work_dir: &Path,
        insecure_plaintext: bool,
    ) -> Result<Self, ProcessError> {
        let logs = work_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io("creating the log directory"))?;
        let (ca, transport) = if insecure_plaintext {
            tracing::warn!("--insecure-plaintext: the roles of this run talk without TLS");
            (None, Transport::Plaintext)
        } else {
            let ca = CertificateAuthority::new(&format!("geoml run {}", std::process::id()))?;
            let tls = work_dir.join("tls");
            let own = tls.join("launcher");
            ca.write_dir(&Identity::new("local", Role::Launcher), &own)?;
            (Some(Arc::new((ca, tls))), Transport::mtls(&own)?)
        };
        Ok(Self {
            geoml: geoml.to_owned(),
            logs,
            ca,
            transport,
        })
    }

    /// The TLS arguments of role process `name`, which is `identity`: its
    /// own certificate in `work_dir/tls/<name>/`, or the plaintext opt-out.
    pub fn tls(&self, name: &str, identity: &Identity) -> Result<TlsArgs, ProcessError> {
        let Some(ca) = &self.ca else {
            return Ok(TlsArgs::insecure_plaintext());
        };
        let (ca, tls) = ca.as_ref();
        let dir = tls.join(name);
        ca.write_dir(identity, &dir)?;
        Ok(TlsArgs::mtls(dir))
    }

    /// How the launcher calls the roles it started (with a certificate of
    /// the run's CA, or in plaintext).
    #[must_use]
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Starts `geoml ARGS` as role `name`, killed if its handle is dropped.
    pub fn spawn(&self, name: &str, args: Vec<String>) -> Result<Process, ProcessError> {
        let log_path = self.logs.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("duplicating a log handle"))?;
        let child = Command::new(&self.geoml)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // An error that ends a role is one line in its log, not a
            // backtrace that would push it out of the tail a failure shows.
            .env("RUST_LIB_BACKTRACE", "0")
            .env(LAUNCHER_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        Ok(Process {
            name: name.to_owned(),
            args,
            child,
            log: log_path,
        })
    }

    /// Starts `process`'s command line again, as a new process.
    pub fn respawn(&self, process: &Process) -> Result<Process, ProcessError> {
        self.spawn(&process.name, process.args.clone())
    }
}

impl Process {
    /// The error for this role having exited with `status`.
    #[must_use]
    pub fn failed(&self, status: ExitStatus) -> ProcessError {
        ProcessError::Failed {
            role: self.name.clone(),
            status,
            log: log_tail(&self.log),
        }
    }

    /// Whether the role has exited successfully; an unsuccessful exit is
    /// an error.
    pub fn exited(&mut self) -> Result<bool, ProcessError> {
        match self
            .child
            .try_wait()
            .map_err(io(format!("watching {}", self.name)))?
        {
            Some(status) if status.success() => Ok(true),
            Some(status) => Err(self.failed(status)),
            None => Ok(false),
        }
    }

    /// Kills the role at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> Result<(), ProcessError> {
        self.child
            .kill()
            .await
            .map_err(io(format!("killing {}", self.name)))
    }

    /// Stops the role with SIGTERM and waits for it to exit successfully.
    pub async fn stop(&mut self) -> Result<(), ProcessError> {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            // The process may have exited already; then there is nothing to stop.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let status = tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| ProcessError::StopTimeout {
                role: self.name.clone(),
            })?
            .map_err(io(format!("waiting for {}", self.name)))?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(status))
        }
    }
}
