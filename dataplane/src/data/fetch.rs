//! Getting files into the cache once, atomically, and reading them back checked.
//!
//! A data set lives in its own directory of the cache. [`ensure_cached`]
//! builds that directory under a private temporary name next to it, checks
//! every file's SHA-256, then renames it into place: readers never see a
//! half-written directory, and when two processes fetch at once the first
//! rename wins and the other keeps what it found. [`read_verified`] checks
//! the hash again on every read, so a corrupted cache is an error, never
//! wrong data.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::DataError;

/// A file a cached data set must contain, and its SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedFile {
    /// File name inside the data set's cache directory.
    pub name: &'static str,
    /// SHA-256 of its content, lower-case hex.
    pub sha256: &'static str,
}

/// The SHA-256 of `bytes`, lower-case hex.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks that `bytes`, the content of `file`, hash to `expected`.
pub fn verify(file: &Path, bytes: &[u8], expected: &str) -> Result<(), DataError> {
    let actual = sha256_hex(bytes);
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(DataError::HashMismatch {
            file: file.to_path_buf(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

/// Reads `path` whole and checks that its content hashes to `expected`.
pub fn read_verified(path: &Path, expected: &str) -> Result<Vec<u8>, DataError> {
    let bytes = fs::read(path).map_err(|source| io_error("reading", path, source))?;
    verify(path, &bytes, expected)?;
    Ok(bytes)
}

/// Makes sure `cache/<dir_name>` holds every file of `files`, and returns
/// that directory.
///
/// When it does already, this costs a few `stat` calls. Otherwise `fetch` is
/// called with two fresh directories, `(work, out)`: it may use `work` for
/// downloads and scratch, and must leave the files of `files` in `out`. Their
/// hashes are checked, then `out` is renamed to `cache/<dir_name>`. If
/// another process installed that directory meanwhile, its copy is kept and
/// ours is dropped. Scratch directories are removed in every case.
pub fn ensure_cached(
    cache: &Path,
    dir_name: &str,
    files: &[ExpectedFile],
    fetch: impl FnOnce(&Path, &Path) -> Result<(), DataError>,
) -> Result<PathBuf, DataError> {
    let dest = cache.join(dir_name);
    if is_complete(&dest, files) {
        return Ok(dest);
    }
    fs::create_dir_all(cache).map_err(|source| io_error("creating", cache, source))?;
    let scratch = ScratchDir::new(cache, dir_name)?;
    let work = scratch.path.join("work");
    let out = scratch.path.join("out");
    for dir in [&work, &out] {
        fs::create_dir(dir).map_err(|source| io_error("creating", dir, source))?;
    }

    let started = Instant::now();
    tracing::info!(data_set = dir_name, cache = %cache.display(), "fetching data set");
    fetch(&work, &out)?;
    for file in files {
        read_verified(&out.join(file.name), file.sha256)?;
    }

    if dest.exists() && !is_complete(&dest, files) {
        // Left by something other than this function (which only ever
        // renames complete directories into place): move it out of the way.
        let stale = scratch.path.join("stale");
        match fs::rename(&dest, &stale) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(io_error("moving aside incomplete", &dest, source)),
        }
    }
    match fs::rename(&out, &dest) {
        Ok(()) => {
            tracing::info!(
                data_set = dir_name,
                seconds = started.elapsed().as_secs_f64(),
                "data set fetched"
            );
            Ok(dest)
        }
        Err(_) if is_complete(&dest, files) => {
            tracing::info!(data_set = dir_name, "another process fetched it first");
            Ok(dest)
        }
        Err(source) => Err(io_error("installing", &dest, source)),
    }
}

/// True when `dir` holds a regular file for each of `files`.
fn is_complete(dir: &Path, files: &[ExpectedFile]) -> bool {
    files.iter().all(|f| dir.join(f.name).is_file())
}

/// Builds a [`DataError::Io`].
pub(crate) fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `command` to completion, turning a failure to start or a non-zero
/// exit into [`DataError::Command`] with the end of its error output.
/// Returns its standard output.
pub fn run(command: &mut Command) -> Result<Vec<u8>, DataError> {
    let line = describe(command);
    let output = command.output().map_err(|e| DataError::Command {
        command: line.clone(),
        detail: if e.kind() == ErrorKind::NotFound {
            format!(
                "{} is not installed",
                command.get_program().to_string_lossy()
            )
        } else {
            format!("could not start: {e}")
        },
    })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(DataError::Command {
            command: line,
            detail: format!("{}: {}", output.status, tail(&output.stderr)),
        })
    }
}

/// The command line of `command`, for messages.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last lines of a program's error output, trimmed for a message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        "no error output".to_owned()
    } else {
        joined
    }
}

/// Finds a file called `name` anywhere below `root`.
pub fn find_file(root: &Path, name: &str) -> Result<Option<PathBuf>, DataError> {
    let entries = fs::read_dir(root).map_err(|source| io_error("listing", root, source))?;
    let mut subdirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_error("listing", root, source))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|source| io_error("inspecting", &path, source))?;
        if kind.is_file() && entry.file_name() == name {
            return Ok(Some(path));
        }
        if kind.is_dir() {
            subdirs.push(path);
        }
    }
    subdirs.sort();
    for dir in subdirs {
        if let Some(found) = find_file(&dir, name)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// A directory private to this process and call, removed when dropped.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `parent/.<label>.tmp-<pid>-<nanos>-<n>`.
    fn new(parent: &Path, label: &str) -> Result<Self, DataError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".{label}.tmp-{}-{nanos}-{n}", std::process::id()));
        fs::create_dir(&path).map_err(|source| io_error("creating", &path, source))?;
        Ok(Self { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove scratch directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn hello() -> [ExpectedFile; 1] {
        [ExpectedFile {
            name: "hello.txt",
            sha256: HELLO_SHA,
        }]
    }

    fn leftovers(cache: &Path) -> Vec<String> {
        fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(sha256_hex(b"hello"), HELLO_SHA);
    }

    #[test]
    fn hash_mismatch_names_file_and_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        fs::write(&path, b"not hello").unwrap();
        let err = read_verified(&path, HELLO_SHA).unwrap_err();
        let DataError::HashMismatch {
            file,
            expected,
            actual,
        } = &err
        else {
            panic!("wrong error: {err}");
        };
        assert_eq!(file, &path);
        assert_eq!(expected, HELLO_SHA);
        assert_eq!(actual, &sha256_hex(b"not hello"));
        let message = err.to_string();
        assert!(
            message.contains("f.bin") && message.contains(HELLO_SHA) && message.contains(actual)
        );
        let missing = read_verified(&path.with_extension("x"), HELLO_SHA).unwrap_err();
        assert!(matches!(missing, DataError::Io { .. }), "{missing}");
    }

    #[test]
    fn fetches_once_then_uses_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let mut calls = 0;
        for _ in 0..2 {
            let dir = ensure_cached(cache.path(), "set", &hello(), |work, out| {
                calls += 1;
                fs::write(work.join("download.deb"), b"scratch").unwrap();
                fs::write(out.join("hello.txt"), b"hello").unwrap();
                Ok(())
            })
            .unwrap();
            assert_eq!(dir, cache.path().join("set"));
            assert_eq!(fs::read(dir.join("hello.txt")).unwrap(), b"hello");
            assert!(!dir.join("download.deb").exists());
        }
        assert_eq!(calls, 1);
        assert!(leftovers(cache.path()).is_empty());
    }

    #[test]
    fn bad_download_is_rejected_and_not_installed() {
        let cache = tempfile::tempdir().unwrap();
        let err = ensure_cached(cache.path(), "set", &hello(), |_, out| {
            fs::write(out.join("hello.txt"), b"tampered").unwrap();
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, DataError::HashMismatch { .. }), "{err}");
        assert!(!cache.path().join("set").exists());
        assert!(leftovers(cache.path()).is_empty());
    }

    #[test]
    fn missing_file_after_fetch_is_an_error() {
        let cache = tempfile::tempdir().unwrap();
        let err = ensure_cached(cache.path(), "set", &hello(), |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        assert!(!cache.path().join("set").exists());
    }

    #[test]
    fn keeps_a_copy_installed_by_another_process_meanwhile() {
        let cache = tempfile::tempdir().unwrap();
        let dest = cache.path().join("set");
        let dir = ensure_cached(cache.path(), "set", &hello(), |_, out| {
            // The other process wins the race while we are downloading.
            fs::create_dir(&dest).unwrap();
            fs::write(dest.join("hello.txt"), b"hello").unwrap();
            fs::write(dest.join("theirs"), b"").unwrap();
            fs::write(out.join("hello.txt"), b"hello").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(dir, dest);
        assert!(dest.join("theirs").exists());
        assert!(leftovers(cache.path()).is_empty());
    }

    #[test]
    fn replaces_an_incomplete_directory() {
        let cache = tempfile::tempdir().unwrap();
        let dest = cache.path().join("set");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("junk"), b"").unwrap();
        ensure_cached(cache.path(), "set", &hello(), |_, out| {
            fs::write(out.join("hello.txt"), b"hello").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(dest.join("hello.txt").exists());
        assert!(!dest.join("junk").exists());
    }

    #[test]
    fn failing_command_reports_status_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("boom") && message.contains('3'),
            "{message}"
        );
        let err = run(&mut Command::new("geoml-no-such-program")).unwrap_err();
        assert!(err.to_string().contains("not installed"), "{err}");
    }

    #[test]
    fn finds_files_in_subdirectories() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("usr/share/x")).unwrap();
        fs::write(root.path().join("usr/share/x/a.gz"), b"").unwrap();
        assert_eq!(
            find_file(root.path(), "a.gz").unwrap(),
            Some(root.path().join("usr/share/x/a.gz"))
        );
        assert_eq!(find_file(root.path(), "b.gz").unwrap(), None);
    }
}
