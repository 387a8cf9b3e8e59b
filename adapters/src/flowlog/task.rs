//! The flow log task: switches counting on in the driver, takes the table
//! every interval and appends one JSON line per flow to the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::table::FlowRecord;
use crate::driver::DriverHandle;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends one JSON line per record to `path`.
fn append_records(path: &Path, records: &[FlowRecord]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut out = std::io::BufWriter::new(file);
    for record in records {
        serde_json::to_writer(&mut out, record).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    }
    out.flush()
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
    info!(path = %path.display(), ?interval, "flow log started");
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
                "flow table full; packets of further flows counted only in total"
            );
        }
        let records = table.drain(start, end, status.as_deref());
        start = end;
        if records.is_empty() {
            continue;
        }
        if let Err(e) = append_records(&path, &records) {
            warn!(path = %path.display(), error = %e, "flow log write failed");
        }
    }
}
