//! SQLite: one process at a time holds a database file, enforced by the operating system.
//!
//! Tally's SQLite design rests on every append to the file being this process's: the stream heads
//! and the in-memory tail of the log are kept in memory, and the command writer checks each
//! append against them instead of an index. A second `tally serve` (or `tally rebuild`, or a
//! `tally keys create` while a server runs) on the same file would write behind their back. So
//! opening the store takes an exclusive lock on `<file>.lock` (`flock`, through the standard
//! library), held until the store is dropped (or the process dies: the kernel lets go), and
//! writes who holds it there, so that the next one can say whom it is waiting for.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock on a database file; released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// `tally.db` → `tally.db.lock`.
pub fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// Who this process is, as the lock file tells the next one.
fn holder() -> String {
    let command: Vec<String> = std::env::args().collect();
    format!("pid {} ({}), since {}", std::process::id(), command.join(" "), crate::clock::now())
}

/// Take the lock on `database`, or say who holds it. A holder that is this very process (a
/// server stopped and started again in one process, whose last references are still going
/// away) is waited for, briefly; any other process means no.
pub fn acquire(database: &Path) -> anyhow::Result<FileLock> {
    let path = lock_path(database);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let mut held_by = String::new();
                let _ = file.read_to_string(&mut held_by);
                let _ = file.seek(SeekFrom::Start(0));
                let ours = held_by.starts_with(&format!("pid {} ", std::process::id()));
                if ours && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let held_by = if held_by.trim().is_empty() { "another process".to_string() } else { held_by };
                anyhow::bail!(
                    "{} is in use by {} (a SQLite database has one Tally process at a time: stop it first, \
                     or use PostgreSQL for several nodes)",
                    database.display(),
                    held_by.trim()
                );
            }
            Err(TryLockError::Error(e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
        }
    }
    file.set_len(0)?;
    file.write_all(holder().as_bytes())?;
    file.flush()?;
    Ok(FileLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_file_is_refused_naming_the_holder_and_free_again_once_let_go() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("t.db");
        let held = acquire(&db).expect("first");
        let contents = std::fs::read_to_string(lock_path(&db)).expect("lock file");
        assert!(contents.starts_with(&format!("pid {} ", std::process::id())), "{contents}");
        drop(held);
        let again = acquire(&db).expect("free once let go");
        drop(again);
    }
}
