//! The flow log task: switches counting on in the driver, takes the table
//! every interval and appends one JSON line per flow to the file.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::table::FlowRecord;
use crate::driver::DriverHandle;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The size at which the flow log file is rotated to `<path>.1` (the one
/// older file kept), so a flood of flows cannot fill the disk.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Flow lines written per interval at most; the smaller flows beyond it
/// are summed into one summary line.
pub const MAX_LINES_PER_INTERVAL: usize = 2_000;

/// The summary line of an interval with more flows than lines allowed, or
/// with packets the full table only counted in total.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OverflowSummary {
    /// Always "flows_summarised", so readers tell it from a flow line.
    pub summary: &'static str,
    /// Interval start, Unix seconds.
    pub start: u64,
    /// Interval end, Unix seconds.
    pub end: u64,
    /// Flows counted but not written one per line.
    pub flows: u64,
    /// Their packets, plus those of flows the full table could not hold.
    pub packets: u64,
    /// Their bytes, likewise.
    pub bytes: u64,
}

/// Where the flow lines go: one file created 0600 without following a
/// symlink, rotated to `<path>.1` at `max_bytes`.
#[derive(Debug, Clone)]
pub struct FlowLogFile {
    path: PathBuf,
    max_bytes: u64,
    max_lines: usize,
}

/// Why a flow log write failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogWriteError {
    /// The file could not be opened (a symlink in its place is refused).
    #[error("{path}: cannot open: {source}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Rotating to `.1` failed.
    #[error("{path}: cannot rotate: {source}")]
    Rotate {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing failed.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl FlowLogFile {
    /// The daemon's limits ([`MAX_FILE_BYTES`], [`MAX_LINES_PER_INTERVAL`]).
    pub fn new(path: PathBuf) -> Self {
        Self::with_limits(path, MAX_FILE_BYTES, MAX_LINES_PER_INTERVAL)
    }

    /// Other limits (tests).
    pub fn with_limits(path: PathBuf, max_bytes: u64, max_lines: usize) -> Self {
        Self {
            path,
            max_bytes,
            max_lines: max_lines.max(1),
        }
    }

    /// The rotated file.
    pub fn rotated_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn open(&self) -> Result<std::fs::File, FlowLogWriteError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = self.path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|source| FlowLogWriteError::Open {
                path: path.clone(),
                source,
            })?;
        // A file left by an older version may be readable by all: narrow
        // it through the descriptor (never by path, which could be swapped).
        let meta = file.metadata().map_err(|source| FlowLogWriteError::Open {
            path: path.clone(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|source| FlowLogWriteError::Open { path, source })?;
        }
        Ok(file)
    }

    /// Appends one line per record, at most the line limit (the largest
    /// flows by bytes), then one [`OverflowSummary`] for the rest and for
    /// `table_overflow` (packets the full table counted only in total).
    /// Rotates first when the file has reached its size.
    pub fn append(
        &self,
        start: u64,
        end: u64,
        records: &[FlowRecord],
        table_overflow: super::table::FlowCounts,
    ) -> Result<(), FlowLogWriteError> {
        let path = self.path.display().to_string();
        let write_err = |source| FlowLogWriteError::Write {
            path: path.clone(),
            source,
        };
        let mut keep = vec![true; records.len()];
        let mut summary = OverflowSummary {
            summary: "flows_summarised",
            start,
            end,
            flows: 0,
            packets: table_overflow.packets,
            bytes: table_overflow.bytes,
        };
        if records.len() > self.max_lines {
            let mut by_size: Vec<usize> = (0..records.len()).collect();
            by_size.sort_by_key(|&i| std::cmp::Reverse(records[i].bytes));
            for &i in &by_size[self.max_lines..] {
                keep[i] = false;
                summary.flows += 1;
                summary.packets += records[i].packets;
                summary.bytes += records[i].bytes;
            }
        }
        let mut text = Vec::new();
        for (record, _) in records.iter().zip(&keep).filter(|(_, keep)| **keep) {
            serde_json::to_writer(&mut text, record)
                .map_err(|e| write_err(std::io::Error::other(e)))?;
            text.push(b'\n');
        }
        if summary.flows > 0 || summary.packets > 0 {
            serde_json::to_writer(&mut text, &summary)
                .map_err(|e| write_err(std::io::Error::other(e)))?;
            text.push(b'\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut file = self.open()?;
        let size = file.metadata().map_err(write_err)?.len();
        if size > 0 && size + text.len() as u64 > self.max_bytes {
            drop(file);
            std::fs::rename(&self.path, self.rotated_path()).map_err(|source| {
                FlowLogWriteError::Rotate {
                    path: path.clone(),
                    source,
                }
            })?;
            file = self.open()?;
        }
        file.write_all(&text).map_err(write_err)?;
        Ok(())
    }
}

/// Runs the flow log: switches counting on in the driver and appends JSON
/// lines to `path` every `interval` (at least a second).
pub async fn run(driver: DriverHandle, path: PathBuf, interval: Duration) {
    if driver.set_flow_log(true).await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(interval.max(Duration::from_secs(1)));
    // The first tick completes at once; the first interval starts now.
    ticker.tick().await;
    let mut start = unix_now();
    let file = FlowLogFile::new(path.clone());
    info!(path = %path.display(), ?interval, max_bytes = MAX_FILE_BYTES, "flow log started");
    loop {
        ticker.tick().await;
        let mut table = match driver.take_flows().await {
            Ok(Some(table)) => table,
            // Counting was switched off behind our back: switch it on again
            // and report from the next interval on.
            Ok(None) => {
                warn!("flow counting was off in the driver; switching it on again");
                if driver.set_flow_log(true).await.is_err() {
                    return;
                }
                start = unix_now();
                continue;
            }
            Err(_) => return,
        };
        let status = driver.status().await.ok();
        let end = unix_now();
        let overflow = table.overflow();
        if overflow.packets > 0 {
            warn!(
                flows = table.len(),
                limit = table.limit(),
                packets = overflow.packets,
                bytes = overflow.bytes,
                "flow table full; packets of further flows counted only in total (one summary line)"
            );
        }
        let records = table.drain(start, end, status.as_deref());
        if let Err(e) = file.append(start, end, &records, overflow) {
            warn!(error = %e, "flow log write failed");
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::flowlog::table::FlowCounts;

    fn record(n: u32, bytes: u64) -> FlowRecord {
        FlowRecord {
            start: 1,
            end: 2,
            direction: "out",
            proto: 17,
            src: format!("100.64.0.1:{n}"),
            dst: "100.64.0.2:53".into(),
            peer: None,
            packets: 1,
            bytes,
        }
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_file_is_private_and_a_symlink_in_its_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let log = FlowLogFile::new(path.clone());
        log.append(1, 2, &[record(1, 100)], FlowCounts::default())
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // An older file readable by all is narrowed.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        log.append(1, 2, &[record(2, 100)], FlowCounts::default())
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let target = dir.path().join("target");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = FlowLogFile::new(link)
            .append(1, 2, &[record(1, 100)], FlowCounts::default())
            .unwrap_err();
        assert!(matches!(err, FlowLogWriteError::Open { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
    }

    #[test]
    fn flows_past_the_line_limit_become_one_summary_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let log = FlowLogFile::with_limits(path.clone(), 1 << 20, 3);
        let records: Vec<FlowRecord> = (0..10).map(|n| record(n, 100 + u64::from(n))).collect();
        let table_overflow = FlowCounts {
            packets: 5,
            bytes: 500,
        };
        log.append(1, 2, &records, table_overflow).unwrap();
        let written = lines(&path);
        assert_eq!(written.len(), 4);
        // The three largest flows are written one per line.
        let kept: Vec<u64> = written[..3]
            .iter()
            .map(|l| l["bytes"].as_u64().unwrap())
            .collect();
        assert_eq!(kept, vec![107, 108, 109]);
        let summary = &written[3];
        assert_eq!(summary["summary"], "flows_summarised");
        assert_eq!(summary["flows"], 7);
        assert_eq!(summary["packets"], 7 + 5);
        assert_eq!(summary["bytes"], (100..107).sum::<u64>() + 500);
    }

    #[test]
    fn the_file_is_rotated_once_at_its_size_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let log = FlowLogFile::with_limits(path.clone(), 4096, 1000);
        for round in 0..200u32 {
            let records: Vec<FlowRecord> = (0..5).map(|n| record(round * 5 + n, 100)).collect();
            log.append(1, 2, &records, FlowCounts::default()).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size <= 4096, "round {round}: {size} bytes");
        }
        let rotated = log.rotated_path();
        assert!(std::fs::metadata(&rotated).unwrap().len() <= 4096);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "one current file and one rotated file");
        // The newest flows are in the current file.
        let last = lines(&path).last().unwrap().clone();
        assert_eq!(last["src"], format!("100.64.0.1:{}", 199 * 5 + 4));
    }
}
