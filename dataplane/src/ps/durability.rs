//! Checkpoints and the write-ahead log of a parameter server.
//!
//! Every push, and every change of mirror state (a peer's update applied,
//! own updates queued for the peers, an update put on a link), is appended
//! to `wal.log` before it takes effect and is acknowledged; every
//! `interval` clocks the whole shard, mirror state included, is written to
//! `checkpoint.bin` (temporary file, fsync, rename) and the log starts
//! over. A restarted server loads the checkpoint and replays the log, so a
//! crashed process loses no acknowledged update. The log is not fsynced per
//! push: it survives the process, not the machine.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::pb;

/// What a server finds on disk when it starts.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The latest checkpoint.
    pub checkpoint: Option<pb::Checkpoint>,
    /// Records logged after it, in order.
    pub log: Vec<pb::WalRecord>,
    /// Bytes of those records.
    pub log_bytes: usize,
}

/// The open checkpoint directory of one shard.
#[derive(Debug)]
pub struct Durability {
    dir: PathBuf,
    wal: File,
    interval: u64,
    next_checkpoint: u64,
}

impl Durability {
    /// Opens (creating) `dir`, returns what it holds, and truncates a torn
    /// last log record.
    pub fn open(dir: &Path, interval: u64) -> io::Result<(Self, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let checkpoint = match std::fs::read(dir.join("checkpoint.bin")) {
            Ok(bytes) => Some(
                pb::Checkpoint::decode(bytes.as_slice())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut wal = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("wal.log"))?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes)?;
        let (log, good) = read_log(&bytes);
        wal.set_len(good as u64)?;
        wal.seek(SeekFrom::End(0))?;
        let next_checkpoint = checkpoint
            .as_ref()
            .map_or(0, |c| c.worker_clocks.iter().copied().min().unwrap_or(0))
            + interval.max(1);
        Ok((
            Self {
                dir: dir.to_owned(),
                wal,
                interval: interval.max(1),
                next_checkpoint,
            },
            Recovered {
                checkpoint,
                log,
                log_bytes: good,
            },
        ))
    }

    /// Appends a record to the log.
    pub fn log(&mut self, record: &pb::WalRecord) -> io::Result<()> {
        self.append(&Self::frame(record)?)
    }

    /// `record` as the log stores it: its length, then its encoding. Needs
    /// no log, so callers frame a record before they take a lock.
    pub fn frame(record: &pb::WalRecord) -> io::Result<Vec<u8>> {
        let body = record.encoded_len();
        let len = u32::try_from(body)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large to log"))?;
        let mut framed = Vec::with_capacity(body + 4);
        framed.extend_from_slice(&len.to_le_bytes());
        record
            .encode(&mut framed)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(framed)
    }

    /// Appends a record framed by [`Self::frame`].
    pub fn append(&mut self, framed: &[u8]) -> io::Result<()> {
        self.wal.write_all(framed)
    }

    /// Whether the slowest worker's `min_clock` calls for a checkpoint.
    #[must_use]
    pub fn due(&self, min_clock: u64) -> bool {
        min_clock >= self.next_checkpoint
    }

    /// Writes `checkpoint` atomically and empties the log.
    pub fn checkpoint(&mut self, checkpoint: &pb::Checkpoint, min_clock: u64) -> io::Result<()> {
        let tmp = self.dir.join("checkpoint.bin.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&checkpoint.encode_to_vec())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("checkpoint.bin"))?;
        File::open(&self.dir)?.sync_all()?;
        // Records the checkpoint already holds are skipped on replay, so a
        // crash between the rename and this truncation loses nothing.
        self.wal.set_len(0)?;
        self.wal.seek(SeekFrom::Start(0))?;
        self.next_checkpoint = min_clock + self.interval;
        Ok(())
    }
}

/// The complete records of a log and the length they span.
fn read_log(bytes: &[u8]) -> (Vec<pb::WalRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(body) = bytes.get(at + 4..at + 4 + len) else {
            break;
        };
        let Ok(record) = pb::WalRecord::decode(body) else {
            break;
        };
        records.push(record);
        at += 4 + len;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(clock: u64) -> pb::WalRecord {
        pb::WalRecord {
            record: Some(pb::wal_record::Record::Push(pb::PushRequest {
                worker: 0,
                clock,
                gradient: None,
            })),
        }
    }

    #[test]
    fn log_survives_reopen_and_torn_records_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, recovered) = Durability::open(dir.path(), 5).unwrap();
        assert!(recovered.checkpoint.is_none() && recovered.log.is_empty());
        d.log(&push(1)).unwrap();
        d.log(&push(2)).unwrap();
        drop(d);
        // A crash in the middle of a write leaves a torn record.
        let wal = dir.path().join("wal.log");
        let mut bytes = std::fs::read(&wal).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1]);
        std::fs::write(&wal, bytes).unwrap();

        let (mut d, recovered) = Durability::open(dir.path(), 5).unwrap();
        assert_eq!(recovered.log, [push(1), push(2)]);
        d.log(&push(3)).unwrap();
        drop(d);
        let (_, recovered) = Durability::open(dir.path(), 5).unwrap();
        assert_eq!(recovered.log, [push(1), push(2), push(3)]);
    }

    #[test]
    fn checkpoint_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _) = Durability::open(dir.path(), 5).unwrap();
        d.log(&push(1)).unwrap();
        assert!(!d.due(4) && d.due(5));
        let checkpoint = pb::Checkpoint {
            worker_clocks: vec![5],
            ..pb::Checkpoint::default()
        };
        d.checkpoint(&checkpoint, 5).unwrap();
        assert!(!d.due(9) && d.due(10));
        d.log(&push(6)).unwrap();
        drop(d);
        let (_, recovered) = Durability::open(dir.path(), 5).unwrap();
        assert_eq!(recovered.checkpoint, Some(checkpoint));
        assert_eq!(recovered.log, [push(6)]);
    }
}
