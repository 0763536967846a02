//! The embedded store's journal: the changes of each batch, appended to `<data-dir>/journal`
//! and synced with one `fdatasync`, so that a batch is durable without a redb commit of its own.
//!
//! Why a journal in front of redb: a durable redb commit writes every page the batch touched
//! (about a dozen, scattered: both B-trees, the table tree, the allocator's state) and syncs
//! them, and nothing else can be written until it returns. A journal record is a few hundred
//! bytes appended in one place, and its sync can run on another thread while the writer
//! applies the next batch. redb still holds the data: each batch is committed to it without a
//! sync (`Durability::None`), and every so often one batch is committed durably instead (a
//! *checkpoint*), after which the journal starts again from its first byte.
//!
//! # Format
//!
//! The file is a sequence of records, each `len: u32 | generation: u64 | crc32: u32 | payload`
//! (little endian; the CRC covers length, generation and payload). The *generation* is the
//! number redb's last durable commit stored (the `meta` table): records of another generation
//! are left over from before a checkpoint and end the replay, and so does a record cut short
//! or never written (its CRC does not match). A record is acknowledged only after a sync that
//! covers it and every record before it, so the records that count are always a prefix.
//!
//! # No metadata in a sync
//!
//! The file is grown ahead of the records by writing zeros, synced once per step, and is then
//! overwritten in place: a record's `fdatasync` writes its data blocks only, never an
//! allocation or a size (ext4 and xfs would journal both for an append, or for a block that
//! `fallocate` merely reserved).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// The journal file inside the data dir.
pub const FILE: &str = "journal";

const HEADER: usize = 16;
/// How far ahead of the records the file is grown (written with zeros and synced).
const GROW_STEP: u64 = 4 << 20;

/// The writer's handle on the journal.
pub struct Journal {
    file: File,
    /// Where the next record goes.
    offset: u64,
    /// How much of the file has been written (zeros or records) and synced.
    prepared: u64,
    generation: u64,
    /// Scratch for one record, reused.
    buffer: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal and returns the payloads of `generation`'s records, in
    /// order: what was acknowledged after redb's last durable commit.
    pub fn open(dir: &Path, generation: u64) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))?;
        let len = file.metadata()?.len();
        let mut records = Vec::new();
        let mut offset = 0u64;
        let mut header = [0u8; HEADER];
        while offset + HEADER as u64 <= len {
            file.read_exact_at(&mut header, offset)?;
            let size = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
            let record_generation = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
            if record_generation != generation || offset + HEADER as u64 + size > len {
                break;
            }
            let mut payload = vec![0u8; size as usize];
            file.read_exact_at(&mut payload, offset + HEADER as u64)?;
            if checksum(&header[0..12], &payload) != crc {
                break;
            }
            records.push(payload);
            offset += HEADER as u64 + size;
        }
        let journal = Journal {
            file,
            offset: 0,
            prepared: len,
            generation,
            buffer: Vec::new(),
        };
        Ok((journal, records))
    }

    /// A second handle on the file, for the thread that syncs it.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The file itself, for a sync on the thread that writes it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of records since the last restart.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// After a durable commit that stored `generation`: the records so far no longer count,
    /// and the next one is written at the start of the file.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.offset = 0;
    }

    /// Writes one record (not synced: the caller syncs through [`Journal::sync_handle`]).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let size = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal record too large"))?;
        self.buffer.clear();
        self.buffer.extend_from_slice(&size.to_le_bytes());
        self.buffer
            .extend_from_slice(&self.generation.to_le_bytes());
        let crc = checksum(&self.buffer, payload);
        self.buffer.extend_from_slice(&crc.to_le_bytes());
        self.buffer.extend_from_slice(payload);
        let end = self.offset + self.buffer.len() as u64;
        if end > self.prepared {
            self.grow(end)?;
        }
        self.file.write_all_at(&self.buffer, self.offset)?;
        self.offset = end;
        Ok(())
    }

    /// Writes zeros up to past `end` and syncs them (size included), once per step.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let target = end.div_ceil(GROW_STEP) * GROW_STEP;
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.prepared;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_data()?;
        self.prepared = target;
        Ok(())
    }
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_the_generation_are_read_back_in_order_until_one_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, records) = Journal::open(dir.path(), 7).unwrap();
        assert!(records.is_empty());
        journal.append(b"one").unwrap();
        journal.append(b"two").unwrap();
        journal.append(b"three").unwrap();
        drop(journal);
        let (_, records) = Journal::open(dir.path(), 7).unwrap();
        assert_eq!(
            records,
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        // Another generation: nothing counts.
        let (_, records) = Journal::open(dir.path(), 8).unwrap();
        assert!(records.is_empty());
        // The last record torn: the ones before it still count.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILE))
            .unwrap();
        let third = 2 * HEADER as u64 + 6;
        file.write_all_at(b"X", third + HEADER as u64 + 2).unwrap();
        let (_, records) = Journal::open(dir.path(), 7).unwrap();
        assert_eq!(records, [b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn after_a_restart_old_records_end_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 1).unwrap();
        journal.append(b"old-1").unwrap();
        journal.append(b"old-2").unwrap();
        journal.restart(2);
        journal.append(b"new").unwrap();
        drop(journal);
        let (_, records) = Journal::open(dir.path(), 2).unwrap();
        assert_eq!(records, [b"new".to_vec()]);
    }
}
