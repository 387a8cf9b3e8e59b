//! `wgmesh`: the command-line client of `wgmeshd`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use rand_core::OsRng;
use wgmesh_adapters::api::{self, ApiRequest, ApiResponse, StatusView};
use wgmesh_core::NodePrivateKey;

/// Talk to a running wgmeshd over its local API socket (root only).
#[derive(Debug, Parser)]
#[command(name = "wgmesh", version)]
struct Cli {
    /// The daemon's API socket (default: /run/wgmesh/<interface>.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// The daemon's interface, to find its socket (default: the only socket
    /// in /run/wgmesh, else "wgmesh0").
    #[arg(short, long, global = true, value_name = "NAME")]
    interface: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show this node and its peers: configured or trimmed, endpoints,
    /// handshakes and bytes.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ping a tailnet address, one line per attempt with latency and path.
    Ping(PingArgs),
    /// Make the daemon re-read its config file (like SIGHUP); a bad file is
    /// refused and the running config kept.
    Reload,
    /// Print the daemon's counters in Prometheus text format.
    Metrics,
    /// Write the plaintext packets entering and leaving the tunnel to a pcap
    /// file (raw IP), readable by tcpdump and wireshark.
    Capture {
        /// The pcap file to write ("-": stdout).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: PathBuf,
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Print a new private key (base64) to stdout.
    Genkey,
    /// Read a private key (base64) on stdin and print its public key.
    Pubkey,
}

#[derive(Debug, ClapArgs)]
struct PingArgs {
    /// Disco ping over UDP, outside WireGuard: measures the path (default).
    #[arg(long, group = "kind")]
    disco: bool,
    /// TSMP ping inside WireGuard, answered by the peer's engine.
    #[arg(long, group = "kind")]
    tsmp: bool,
    /// ICMP echo inside WireGuard, answered by the peer's OS.
    #[arg(long, group = "kind")]
    icmp: bool,
    /// Send exactly this many pings and print a line for each, like
    /// `ping -c`. Without it: up to 10, stopping at the first pong, like
    /// `tailscale ping`.
    #[arg(short = 'c', long)]
    count: Option<u32>,
    /// Extra payload bytes (ICMP only).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// Without `-c`: send all 10 instead of stopping at the first pong.
    #[arg(long)]
    until_count: bool,
    /// The tailnet address.
    ip: IpAddr,
}

fn socket_path(cli: &Cli) -> PathBuf {
    if let Some(path) = &cli.socket {
        return path.clone();
    }
    let dir = PathBuf::from("/run/wgmesh");
    if let Some(name) = &cli.interface {
        return api::default_socket(&dir, name);
    }
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            let mut v: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    match found.as_slice() {
        [only] => only.clone(),
        _ => api::default_socket(&dir, "wgmesh0"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Genkey => {
            println!("{}", NodePrivateKey::generate(&mut OsRng).to_base64());
            return ExitCode::SUCCESS;
        }
        Command::Pubkey => {
            let mut text = String::new();
            if std::io::stdin().read_line(&mut text).is_err() {
                eprintln!("wgmesh: cannot read stdin");
                return ExitCode::FAILURE;
            }
            return match text.trim().parse::<NodePrivateKey>() {
                Ok(key) => {
                    println!("{}", key.public_key());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wgmesh: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wgmesh: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(&cli))
}

async fn call(cli: &Cli, request: &ApiRequest) -> Result<ApiResponse, String> {
    api::call(&socket_path(cli), request)
        .await
        .map_err(|e| e.to_string())
}

async fn run(cli: &Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Status { json } => status(cli, *json).await,
        Command::Ping(args) => ping(cli, args).await,
        Command::Reload => simple(cli, ApiRequest::Reload).await,
        Command::Metrics => simple(cli, ApiRequest::Metrics).await,
        Command::Capture { output, seconds } => capture(cli, output, *seconds).await,
        Command::Genkey | Command::Pubkey => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wgmesh: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn capture(cli: &Cli, output: &std::path::Path, seconds: Option<u64>) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let path = socket_path(cli);
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| format!("cannot reach wgmeshd at {}: {e}", path.display()))?;
    let mut request =
        serde_json::to_string(&ApiRequest::Capture { seconds }).map_err(|e| e.to_string())?;
    request.push('\n');
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let copied = if output == std::path::Path::new("-") {
        let mut out = tokio::io::stdout();
        tokio::select! {
            r = tokio::io::copy(&mut stream, &mut out) => r.map_err(|e| e.to_string())?,
            _ = tokio::signal::ctrl_c() => 0,
        }
    } else {
        // The capture holds the tunnel's plaintext: 0600, whatever the umask.
        let mut file = wgmesh_adapters::api::create_capture_file(output)
            .map(tokio::fs::File::from_std)
            .map_err(|e| format!("{}: {e}", output.display()))?;
        let copied = tokio::select! {
            r = tokio::io::copy(&mut stream, &mut file) => r.map_err(|e| e.to_string())?,
            _ = tokio::signal::ctrl_c() => 0,
        };
        file.flush().await.map_err(|e| e.to_string())?;
        copied
    };
    eprintln!("capture: {copied} bytes written");
    Ok(())
}

async fn simple(cli: &Cli, request: ApiRequest) -> Result<(), String> {
    let response = call(cli, &request).await?;
    if !response.ok {
        return Err(response.error.unwrap_or_else(|| "failed".into()));
    }
    if let Some(text) = response.text {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

async fn status(cli: &Cli, json: bool) -> Result<(), String> {
    let response = call(cli, &ApiRequest::Status).await?;
    let Some(status) = response.status.filter(|_| response.ok) else {
        return Err(response.error.unwrap_or_else(|| "no status".into()));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

fn render_status(status: &StatusView) -> String {
    let mut out = format!(
        "{}  {}  port {}  addrs {}\n",
        status.interface,
        status.node_key,
        status.listen_port,
        status.local_addrs.join(",")
    );
    if let Some(c) = &status.control {
        let since = c
            .secs_since_push
            .map_or_else(|| "never".to_owned(), |s| format!("{s:.1}s ago"));
        out.push_str(&format!(
            "  control {}  {}  netmap seq {}  last push {}  peers {}{}\n",
            c.url,
            if c.connected {
                "connected"
            } else {
                "disconnected"
            },
            c.netmap_seq
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            since,
            c.peers,
            c.last_error
                .as_deref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&render_health(&status.health));
    if let Some(exit) = &status.exit_node {
        out.push_str(&format!(
            "exit node: {exit} (everything outside the tailnet goes through it)\n"
        ));
    }
    if !status.endpoints.is_empty() {
        out.push_str(&format!("  endpoints {}\n", status.endpoints.join(", ")));
    }
    if let Some(relay) = &status.relay {
        out.push_str(&format!("  relay {relay}\n"));
    }
    for p in &status.peers {
        let state = if p.configured {
            "active"
        } else {
            "idle (trimmed)"
        };
        // The path: the direct address, or "relay" when only the
        // peer's relay answers.
        let path = match (&p.endpoint, p.via_relay) {
            (Some(endpoint), true) => format!("relay {endpoint}"),
            (Some(endpoint), false) => endpoint.clone(),
            (None, _) => "-".into(),
        };
        let handshake = match p.last_handshake_secs_ago {
            Some(s) => format!("handshake {s:.0}s ago"),
            None => "no handshake".into(),
        };
        out.push_str(&format!(
            "  {:<16} {:<20} {:<14} {:<22} {:<20} rx {} tx {}\n",
            if p.name.is_empty() { "-" } else { &p.name },
            p.allowed_ips.join(","),
            state,
            path,
            handshake,
            p.rx_bytes,
            p.tx_bytes
        ));
    }
    out
}

/// The health section: one line, then one per current problem.
fn render_health(health: &api::HealthView) -> String {
    let mut out = format!("health: {}\n", health.state);
    for p in &health.problems {
        let since = match p.since_unix {
            Some(unix) => format!("since unix time {unix} ({:.0}s ago)", p.since_secs_ago),
            None => format!("for {:.0}s", p.since_secs_ago),
        };
        out.push_str(&format!(
            "  {} {}: {} {since}\n",
            p.subsystem, p.severity, p.reason
        ));
    }
    out
}

/// Pings sent without `-c` at most.
const DEFAULT_PING_COUNT: u32 = 10;

/// How many pings to send and whether the first pong ends them.
fn ping_plan(count: Option<u32>, until_count: bool) -> (u32, bool) {
    match count {
        // `-c N`: N pings, each with its line, whatever they answer.
        Some(n) => (n.max(1), false),
        None => (DEFAULT_PING_COUNT, !until_count),
    }
}

/// Sends the pings through `one` (one ping each) and prints a line per
/// ping with `print`; returns (sent, answered). An error answer ends the
/// run with that error.
async fn run_pings<F, Fut>(
    count: Option<u32>,
    until_count: bool,
    pause: Duration,
    mut one: F,
    mut print: impl FnMut(&str),
) -> Result<(u32, u32), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<api::PingView, String>>,
{
    let (attempts, stop_at_pong) = ping_plan(count, until_count);
    let mut answered = 0;
    let mut sent = 0;
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(pause).await;
        }
        let view = one().await?;
        sent += 1;
        print(&view.line());
        if view.outcome == "pong" {
            answered += 1;
            if stop_at_pong {
                break;
            }
        } else if view.outcome == "error" {
            return Err(view.error.unwrap_or_else(|| "ping failed".into()));
        }
    }
    Ok((sent, answered))
}

async fn ping(cli: &Cli, args: &PingArgs) -> Result<(), String> {
    let kind = if args.tsmp {
        "tsmp"
    } else if args.icmp {
        "icmp"
    } else {
        "disco"
    };
    let request = ApiRequest::Ping {
        ip: args.ip,
        kind: kind.into(),
        size: args.size,
    };
    let (sent, answered) = run_pings(
        args.count,
        args.until_count,
        Duration::from_millis(500),
        || async {
            let response = call(cli, &request).await?;
            response
                .ping
                .ok_or_else(|| response.error.unwrap_or_else(|| "ping failed".into()))
        },
        |line| println!("{line}"),
    )
    .await?;
    if args.count.is_some() {
        println!(
            "--- {} ping statistics ---\n{sent} pings sent, {answered} answered",
            args.ip
        );
    }
    if answered == 0 {
        return Err(format!("no reply from {} after {sent} attempts", args.ip));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pong() -> api::PingView {
        api::PingView {
            outcome: "pong".into(),
            ..api::PingView::default()
        }
    }

    async fn pings(count: Option<u32>, until_count: bool) -> (u32, u32, usize) {
        let mut calls = 0;
        let mut lines = 0;
        let (sent, answered) = run_pings(
            count,
            until_count,
            Duration::ZERO,
            || {
                calls += 1;
                async { Ok(pong()) }
            },
            |_| lines += 1,
        )
        .await
        .unwrap();
        assert_eq!(sent, calls);
        (sent, answered, lines)
    }

    /// Issue 15: `-c N` sends N pings and prints N lines, even when every
    /// one is answered; without `-c` the first pong ends the run.
    #[tokio::test]
    async fn count_sends_that_many_pings_and_prints_a_line_each() {
        assert_eq!(pings(Some(4), false).await, (4, 4, 4));
        assert_eq!(pings(Some(1), false).await, (1, 1, 1));
        assert_eq!(pings(None, false).await, (1, 1, 1));
        assert_eq!(pings(None, true).await, (10, 10, 10));
    }

    #[tokio::test]
    async fn an_error_answer_ends_the_run() {
        let mut calls = 0;
        let result = run_pings(
            Some(5),
            false,
            Duration::ZERO,
            || {
                calls += 1;
                async {
                    Ok(api::PingView {
                        outcome: "error".into(),
                        error: Some("no such peer".into()),
                        ..api::PingView::default()
                    })
                }
            },
            |_| {},
        )
        .await;
        assert_eq!(result, Err("no such peer".into()));
        assert_eq!(calls, 1);
    }
}
