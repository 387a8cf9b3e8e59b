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
    /// Number of pings.
    #[arg(short = 'c', long, default_value_t = 10)]
    count: u32,
    /// Extra payload bytes (ICMP only).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// Keep pinging after the first answer (default: stop at the first pong,
    /// like `tailscale ping`).
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
    for p in &status.peers {
        let state = if p.configured {
            "active"
        } else {
            "idle (trimmed)"
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
            p.endpoint.as_deref().unwrap_or("-"),
            handshake,
            p.rx_bytes,
            p.tx_bytes
        ));
    }
    out
}

async fn ping(cli: &Cli, args: &PingArgs) -> Result<(), String> {
    let kind = if args.tsmp {
        "tsmp"
    } else if args.icmp {
        "icmp"
    } else {
        "disco"
    };
    let mut answered = 0;
    for attempt in 0..args.count.max(1) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let request = ApiRequest::Ping {
            ip: args.ip,
            kind: kind.into(),
            size: args.size,
        };
        let response = call(cli, &request).await?;
        match response.ping {
            Some(view) => {
                println!("{}", view.line());
                if view.outcome == "pong" {
                    answered += 1;
                    if !args.until_count {
                        break;
                    }
                } else if view.outcome == "error" {
                    return Err(view.error.unwrap_or_else(|| "ping failed".into()));
                }
            }
            None => return Err(response.error.unwrap_or_else(|| "ping failed".into())),
        }
    }
    if answered == 0 {
        return Err(format!(
            "no reply from {} after {} attempts",
            args.ip,
            args.count.max(1)
        ));
    }
    Ok(())
}
