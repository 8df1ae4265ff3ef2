//! The nodes' cgroups: every process a node starts (containerd, its shims,
//! the pods) lives under cgroups named after the node, in every hierarchy, so
//! that stopping a node can find and kill all of them and remove the cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies' root directories (cgroup v1: one per controller, plus
/// `systemd` and `unified`; v2: the root itself).
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    subdirs(root)
}

/// The directories of cgroup `name` in every hierarchy, created if missing.
pub fn create(name: &str) -> Vec<PathBuf> {
    hierarchies()
        .into_iter()
        .map(|h| h.join(name))
        .filter(|dir| std::fs::create_dir_all(dir).is_ok())
        .collect()
}

/// A shell fragment that moves the shell into cgroup `name` in every
/// hierarchy; a command `exec`ed after it (and all its children) stays there.
#[must_use]
pub fn join_script(name: &str) -> String {
    let dirs: Vec<String> = create(name)
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    format!(
        "for d in {}; do echo $$ > \"$d/cgroup.procs\" 2>/dev/null || true; done",
        dirs.join(" ")
    )
}

/// Kills every process in the cgroups whose names start with `prefix` (in
/// every hierarchy, with their children) and removes those cgroups.
pub fn remove_all(prefix: &str) {
    let mut tops = Vec::new();
    for hierarchy in hierarchies() {
        for entry in std::fs::read_dir(&hierarchy)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                tops.push(entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = tops.iter().flat_map(|t| procs(t)).collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for top in tops {
        remove_tree(&top);
    }
}

/// PIDs in `dir` and its descendants.
fn procs(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for child in subdirs(dir) {
        pids.extend(procs(&child));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Removes an empty cgroup tree, children first (cgroupfs removes only
/// directories, whose control files go with them).
fn remove_tree(dir: &Path) {
    for child in subdirs(dir) {
        remove_tree(&child);
    }
    let _ = std::fs::remove_dir(dir);
}
