//! The embedded store's journal: the changes of each batch, appended to a journal file in the
//! data dir and synced with one `fdatasync`, so that a batch is durable without a redb commit
//! of its own.
//!
//! Why a journal in front of redb: a durable redb commit writes every page the batch touched
//! (about a dozen, scattered: both B-trees, the table tree, the allocator's state) and syncs
//! them, and nothing else can be written until it returns. A journal record is a few hundred
//! bytes appended in one place, and its sync can run on another thread while the writer
//! applies the next batch. redb gets the data at checkpoints: every so often one applies the
//! journal's records since the last one to redb and commits durably, after which the journal
//! starts over.
//!
//! # Two files, one per generation's parity
//!
//! A checkpoint runs beside the writer (see the store's module doc): the batches the writer
//! applies meanwhile are journaled as the *next* generation, while the records of the current
//! one must stay until redb's commit is on disk (a crash before it brings redb back to the
//! current generation, which needs them). So generation `n` is written to `FILES[n % 2]`, from
//! its first byte, and at open the records of redb's generation and of the one after it are
//! applied, in that order: a crash during a checkpoint replays both.
//!
//! # Format
//!
//! Each file is a sequence of records, each `len: u32 | generation: u64 | crc32: u32 | payload`
//! (little endian; the CRC covers length, generation and payload). Records of another
//! generation than the one read are left over from an earlier use of the file and end the
//! read, and so does a record cut short or never written (its CRC does not match). A record is
//! acknowledged only after a sync that covers it and every record before it, so the records
//! that count are always a prefix.
//!
//! # No metadata in a sync
//!
//! A file is grown ahead of the records by writing zeros, synced once per step, and is then
//! overwritten in place: a record's `fdatasync` writes its data blocks only, never an
//! allocation or a size (ext4 and xfs would journal both for an append, or for a block that
//! `fallocate` merely reserved).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

/// The journal files inside the data dir: generation `n` goes to `FILES[n % 2]`. (Data dirs
/// from before checkpoints ran beside the writer have only the first, of any generation: both
/// are read for each generation.)
pub const FILES: [&str; 2] = ["journal", "journal.1"];

const HEADER: usize = 16;
/// How far ahead of the records a file is grown (written with zeros and synced).
const GROW_STEP: u64 = 4 << 20;

/// The writer's handle on the journal.
pub struct Journal {
    files: [Arc<File>; 2],
    /// How much of each file has been written (zeros or records) and synced.
    prepared: [u64; 2],
    generation: u64,
    /// Where the next record goes, in `files[generation % 2]`.
    offset: u64,
    /// Scratch for one record, reused.
    buffer: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal files and returns the payloads of `generation`'s
    /// records, then those of `generation + 1`, in order: what was acknowledged after redb's
    /// last durable commit, and after a checkpoint that may not have reached the disk. The
    /// journal then writes nothing until [`Journal::restart`].
    pub fn open(dir: &Path, generation: u64) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let files = [Arc::new(open(FILES[0])?), Arc::new(open(FILES[1])?)];
        let prepared = [files[0].metadata()?.len(), files[1].metadata()?.len()];
        let mut records = Vec::new();
        for generation in [generation, generation + 1] {
            // Its own file first (the other one holds it only in an older data dir).
            let own = (generation % 2) as usize;
            for file in [own, 1 - own] {
                records.extend(read(&files[file], prepared[file], generation)?);
            }
        }
        let journal = Journal {
            files,
            prepared,
            generation,
            offset: 0,
            buffer: Vec::new(),
        };
        Ok((journal, records))
    }

    /// The file records are written to now, for the thread that syncs it.
    pub fn file(&self) -> &Arc<File> {
        &self.files[(self.generation % 2) as usize]
    }

    /// Bytes of records since the last restart.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// From now on records are of `generation` (the next checkpoint's), written from the first
    /// byte of its file. The caller has synced every record before (the syncer syncs only the
    /// file of the newest batch it is handed), or makes them durable in redb before it writes
    /// the next record.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.offset = 0;
    }

    /// Writes one record (not synced: the caller syncs [`Journal::file`]).
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
        let index = (self.generation % 2) as usize;
        if end > self.prepared[index] {
            self.grow(index, end)?;
        }
        self.files[index].write_all_at(&self.buffer, self.offset)?;
        self.offset = end;
        Ok(())
    }

    /// Writes zeros up to past `end` and syncs them (size included), once per step.
    fn grow(&mut self, index: usize, end: u64) -> io::Result<()> {
        let target = end.div_ceil(GROW_STEP) * GROW_STEP;
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.prepared[index];
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.files[index].write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.files[index].sync_data()?;
        self.prepared[index] = target;
        Ok(())
    }
}

/// The payloads of `generation`'s records at the start of `file` (`len` bytes long).
fn read(file: &File, len: u64, generation: u64) -> io::Result<Vec<Vec<u8>>> {
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
    Ok(records)
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

    fn payloads(names: &[&str]) -> Vec<Vec<u8>> {
        names.iter().map(|n| n.as_bytes().to_vec()).collect()
    }

    #[test]
    fn records_of_the_generation_are_read_back_in_order_until_one_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, records) = Journal::open(dir.path(), 6).unwrap();
        assert!(records.is_empty());
        journal.restart(7);
        journal.append(b"one").unwrap();
        journal.append(b"two").unwrap();
        journal.append(b"three").unwrap();
        drop(journal);
        let (_, records) = Journal::open(dir.path(), 7).unwrap();
        assert_eq!(records, payloads(&["one", "two", "three"]));
        // Read as the generation after redb's (a checkpoint that did not land) too.
        let (_, records) = Journal::open(dir.path(), 6).unwrap();
        assert_eq!(records, payloads(&["one", "two", "three"]));
        // A later generation: nothing counts.
        let (_, records) = Journal::open(dir.path(), 8).unwrap();
        assert!(records.is_empty());
        // The last record torn: the ones before it still count.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILES[1]))
            .unwrap();
        let third = 2 * HEADER as u64 + 6;
        file.write_all_at(b"X", third + HEADER as u64 + 2).unwrap();
        let (_, records) = Journal::open(dir.path(), 7).unwrap();
        assert_eq!(records, payloads(&["one", "two"]));
    }

    #[test]
    fn a_checkpoint_in_flight_leaves_two_generations_which_are_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 1).unwrap();
        journal.restart(2);
        journal.append(b"before-1").unwrap();
        journal.append(b"before-2").unwrap();
        // A checkpoint to generation 3 begins: later batches go to the other file.
        journal.restart(3);
        journal.append(b"during").unwrap();
        drop(journal);
        // redb still at 2 (the checkpoint never reached the disk): both, in order.
        let (_, records) = Journal::open(dir.path(), 2).unwrap();
        assert_eq!(records, payloads(&["before-1", "before-2", "during"]));
        // redb at 3: what came before the checkpoint is in it.
        let (mut journal, records) = Journal::open(dir.path(), 3).unwrap();
        assert_eq!(records, payloads(&["during"]));
        // Generation 4 reuses the first file from its start; its old records end the read.
        journal.restart(4);
        journal.append(b"next").unwrap();
        drop(journal);
        let (_, records) = Journal::open(dir.path(), 4).unwrap();
        assert_eq!(records, payloads(&["next"]));
        let (_, records) = Journal::open(dir.path(), 3).unwrap();
        assert_eq!(records, payloads(&["during", "next"]));
    }

    #[test]
    fn an_older_data_dir_with_one_file_is_read_whatever_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        // What the store wrote before there were two files: the only file, generation 5.
        let mut record = Vec::new();
        record.extend_from_slice(&3u32.to_le_bytes());
        record.extend_from_slice(&5u64.to_le_bytes());
        let crc = checksum(&record, b"old");
        record.extend_from_slice(&crc.to_le_bytes());
        record.extend_from_slice(b"old");
        std::fs::write(dir.path().join(FILES[0]), &record).unwrap();
        let (_, records) = Journal::open(dir.path(), 5).unwrap();
        assert_eq!(records, payloads(&["old"]));
    }
}
